//! The slot's continuity, checked at the start of every session: is this the
//! server, on the timeline, this process streamed from before, and is the slot
//! there (created only by a process that never saw it)? Each answer that would
//! stream past a gap is a fatal [`RelayError::SlotGap`] naming the backfill;
//! the rules themselves are in [`super::identity`].

use std::time::Duration;

use crate::config::PostgresConfig;
use crate::lsn::Lsn;
use crate::replication::{ConnectConfig, ReplicationClient};
use crate::setup::SlotState;
use crate::sql::SqlConnection;

use super::error::slot_creation_error;
use super::{facts, identity, progress, Relay, RelayError, LOG_TARGET};

impl Relay {
    /// Is this the server, and the slot, this process streamed from before?
    /// Returns the server's identity and the replication connection's database.
    pub(super) async fn check_server(
        &mut self,
        repl: &mut ReplicationClient,
        client: &SqlConnection,
        pg: &PostgresConfig,
        connect: &ConnectConfig,
        version: u32,
        slot_exists: bool,
    ) -> Result<(identity::ServerIdentity, String), RelayError> {
        let system = repl.identify_system().await?;
        let repl_db = system.dbname.clone().unwrap_or_default();
        let server = identity::ServerIdentity {
            system_id: system.system_id.clone(),
            timeline: system.timeline,
        };
        let failover = facts::slot_failover(client, &pg.slot, version).await?;
        self.metrics
            .server_identity(&server.system_id, server.timeline);
        let was = self.memory.server.clone();
        if let Err(gap) = self.memory.check_server(&server, failover) {
            return Err(self.gap(gap));
        }
        if let Some(was) = was.filter(|w| w.timeline != server.timeline) {
            // Followed a promotion with a failover slot: only if the new
            // timeline's history holds everything this process confirmed.
            let history = repl.timeline_history(server.timeline).await?;
            if let Err(gap) = self
                .memory
                .check_fork(was.timeline, server.timeline, &history)
            {
                self.memory.server = Some(was);
                return Err(self.gap(gap));
            }
            tracing::warn!(target: LOG_TARGET,
                from_timeline = was.timeline,
                to_timeline = server.timeline,
                host = %connect.host,
                port = connect.port,
                "followed a failover: the failover slot carried over to the promoted server; transactions after its confirmed position come again (duplicates, same ids)"
            );
        }
        if self.memory.slot_seen || self.started {
            // This process knows the slot; the checks above judged it.
        } else if let Some(gap) = self
            .lost_in_failover(client, &server, &repl_db, slot_exists && failover)
            .await
        {
            return Err(gap);
        }
        Ok((server, repl_db))
    }

    /// The position the slot confirmed, after checking it is usable; a missing
    /// slot is created if this process may (and the settings allow).
    pub(super) async fn confirmed_position(
        &mut self,
        repl: &mut ReplicationClient,
        pg: &PostgresConfig,
        slot: Option<SlotState>,
        version: u32,
    ) -> Result<Lsn, RelayError> {
        Ok(match slot {
            Some(s) => {
                self.memory.slot_seen = true;
                if s.invalidated {
                    return Err(RelayError::SlotInvalidated {
                        slot: pg.slot.clone(),
                        reason: s.wal_status.clone().unwrap_or_else(|| "lost".into()),
                    });
                }
                if s.plugin != "pgoutput" {
                    return Err(RelayError::SlotPlugin {
                        slot: pg.slot.clone(),
                        plugin: s.plugin.clone(),
                    });
                }
                s.confirmed_flush_lsn.unwrap_or(Lsn::ZERO)
            }
            None if pg.create_slot => {
                if let Err(gap) = self.memory.may_create_slot() {
                    return Err(self.gap(gap));
                }
                let created = repl
                    .create_logical_slot_with(&pg.slot, pg.failover_slot)
                    .await
                    .map_err(|e| slot_creation_error(e, &pg.slot))?;
                self.memory.slot_seen = true;
                tracing::warn!(target: LOG_TARGET,
                    slot = %pg.slot,
                    consistent_point = %created.consistent_point,
                    failover_slot = version >= 170000 && pg.failover_slot,
                    "created replication slot: events are relayed from transactions committing after this position; anything committed before it is not (use table replay for older rows)"
                );
                created.consistent_point
            }
            None => {
                if self.memory.slot_seen {
                    return Err(self.gap(identity::Gap::SlotGone));
                }
                return Err(RelayError::SlotMissing {
                    slot: pg.slot.clone(),
                });
            }
        })
    }

    /// A process that never saw its slot, on a server promoted since the
    /// progress table last recorded the slot on this cluster: the slot did not
    /// come through the promotion unless it is a failover slot (`carried`).
    async fn lost_in_failover(
        &self,
        client: &crate::sql::SqlConnection,
        server: &identity::ServerIdentity,
        database: &str,
        carried: bool,
    ) -> Option<RelayError> {
        let pg = &self.cfg.postgres;
        let (system_id, timeline, recorded, at) =
            progress::read_any(client, &pg.table, &pg.slot, database).await?;
        if carried || system_id != server.system_id || timeline >= server.timeline {
            return None;
        }
        let forget = format!(
            "DELETE FROM {} WHERE slot_name = {}",
            progress::table_name(&pg.table),
            crate::config::quote_literal(&pg.slot)
        );
        let from = at.checked_sub(Duration::from_secs(60)).unwrap_or(at);
        Some(RelayError::SlotGap {
            gap: identity::Gap::LostInFailover {
                recorded_timeline: timeline,
                now: server.timeline,
                recorded,
                forget,
            }
            .describe(&pg.slot),
            loss: format!(
                "The relay had acknowledged everything up to {recorded} by {}; events committed after that may be missing from Kafka: backfill them from the outbox table with `outbox-relay replay --from-time {}` (a minute of margin; consumers deduplicate by id)",
                humantime::format_rfc3339_seconds(at),
                humantime::format_rfc3339_seconds(from),
            ),
        })
    }

    /// The fatal error for a gap, naming what was delivered and the backfill.
    fn gap(&self, gap: identity::Gap) -> RelayError {
        RelayError::SlotGap {
            gap: gap.describe(&self.cfg.postgres.slot),
            loss: self.memory.describe_loss(),
        }
    }
}
