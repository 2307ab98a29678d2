//! Taking over a slot from a relay that died with its connection half-open.

use crate::config::Config;

/// The slot is held: if the holder is a walsender carrying our
/// application_name that has sent no status reply for `stale_holder_timeout`
/// (the half-open connection of a relay that died), terminate it. A live relay
/// replies every status interval, so it is never taken for stale.
pub(super) async fn terminate_stale_holder(cfg: &Config) {
    let Ok(client) = crate::sql::connect(&cfg.postgres).await else {
        return;
    };
    let row = client
        .query_opt(
            "SELECT s.active_pid, r.application_name, \
                    extract(epoch FROM now() - coalesce(r.reply_time, r.backend_start))::float8 \
             FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&cfg.postgres.slot],
        )
        .await;
    let Ok(Some(row)) = row else { return };
    let pid: i32 = row.get(0);
    let app: Option<String> = row.get(1);
    let silent_for: f64 = row.get(2);
    if app.as_deref() != Some(cfg.postgres.application_name.as_str())
        || silent_for < cfg.relay.stale_holder_timeout.as_secs_f64()
    {
        return;
    }
    match client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
    {
        Ok(_) => tracing::warn!(
            pid,
            silent_for_s = silent_for,
            "terminated a stale walsender holding the slot under our application_name"
        ),
        Err(e) => {
            tracing::warn!(pid, error = %crate::setup::describe_pg_error(&e), "cannot terminate the stale walsender holding the slot")
        }
    }
}
