//! The second half of the catch-up ceiling: a minimal Rust client that reads
//! the slot's pgoutput stream and discards it, on the relay's own replication
//! client (`outbox_relay::replication`) with the relay's stream options, so the
//! ceiling does not depend on how fast `pg_recvlogical` writes `/dev/null`.
//! Runs as its own process (`outbox-bench raw-stream ...`) for clean CPU and
//! memory figures. It coalesces reads as the relay does while behind (a read
//! of fewer than 32 frames: wait 1 ms with `SO_RCVLOWAT` at 64 KiB, see the
//! relay's `src/relay/coalesce.rs`); without that the ceiling was the cost of
//! waking up for each of the walsender's sends, and the relay beat it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use outbox_relay::replication::{ConnectConfig, ReplicationClient, ReplicationMessage};
use outbox_relay::Lsn;

#[derive(Debug, Args)]
pub struct StreamArgs {
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub slot: String,
    #[arg(long)]
    pub publication: String,
    /// Stop at the first commit (or keepalive) at or past this LSN
    /// (like `pg_recvlogical --endpos`).
    #[arg(long, value_parser = parse_lsn)]
    pub end_lsn: u64,
    /// Where to write the summary (JSON).
    #[arg(long)]
    pub summary: PathBuf,
}

fn parse_lsn(s: &str) -> Result<u64, String> {
    crate::scenarios::parse_lsn(s).ok_or_else(|| format!("not an LSN: {s}"))
}

/// The relay's read coalescing while behind (`src/relay/coalesce.rs`); a
/// catch-up backlog is behind from its first byte to its last.
const SMALL_BURST: usize = 32;
const PAUSE: Duration = Duration::from_millis(1);
const LOW_WATER: usize = 64 * 1024;

#[derive(Debug, Serialize)]
struct Summary {
    messages: u64,
    bytes: u64,
    elapsed_s: f64,
}

pub fn main(a: StreamArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let summary = runtime.block_on(read(&a))?;
    std::fs::write(
        &a.summary,
        serde_json::to_vec(&summary).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("write {}: {e}", a.summary.display()))
}

async fn read(a: &StreamArgs) -> Result<Summary, String> {
    let cfg = ConnectConfig {
        host: "127.0.0.1".into(),
        port: a.port,
        user: "postgres".into(),
        dbname: "postgres".into(),
        application_name: "outbox-bench-raw-stream".into(),
        connect_timeout: Duration::from_secs(10),
        max_frame_bytes: 256 << 20,
        ..ConnectConfig::default()
    };
    let client = ReplicationClient::connect(&cfg)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The stream the relay reads by default (logical decoding messages on).
    let options =
        outbox_relay::relay::pgoutput_options(client.server_version_num(), &a.publication, true);
    let began = Instant::now();
    let mut stream = client
        .start_logical_replication(&a.slot, Lsn(0), &options)
        .await
        .map_err(|e| format!("start replication: {e}"))?;
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut last_status = Instant::now();
    let mut last_end = Lsn(0);
    loop {
        let mut msg = stream
            .next_message()
            .await
            .map_err(|e| format!("read: {e}"))?
            .ok_or("the stream ended before the end LSN")?;
        // Like the relay: everything already buffered in one wake-up.
        let mut burst = 0;
        let done = loop {
            messages += 1;
            burst += 1;
            let end = match &msg {
                ReplicationMessage::XLogData { data, .. } => {
                    bytes += data.len() as u64;
                    // Commit: 'C', flags (1), commit LSN (8), end LSN (8), time (8).
                    (data.first() == Some(&b'C') && data.len() >= 18)
                        .then(|| u64::from_be_bytes(data[10..18].try_into().expect("8 bytes")))
                }
                ReplicationMessage::Keepalive { wal_end, .. } => Some(wal_end.0),
            };
            if let Some(end) = end {
                last_end = Lsn(end.max(last_end.0));
                if end >= a.end_lsn {
                    break true;
                }
            }
            match stream.try_next_buffered().map_err(|e| e.to_string())? {
                Some(next) => msg = next,
                None => break false,
            }
        };
        if done {
            break;
        }
        if burst < SMALL_BURST {
            stream
                .set_read_low_water(LOW_WATER)
                .map_err(|e| format!("SO_RCVLOWAT: {e}"))?;
            tokio::time::sleep(PAUSE).await;
            stream
                .set_read_low_water(1)
                .map_err(|e| format!("SO_RCVLOWAT: {e}"))?;
        }
        if last_status.elapsed() > Duration::from_secs(10) {
            stream
                .send_status_update(last_end, last_end, last_end, false)
                .await
                .map_err(|e| format!("status update: {e}"))?;
            last_status = Instant::now();
        }
    }
    let elapsed_s = began.elapsed().as_secs_f64();
    let _ = stream.finish(Duration::from_secs(5)).await;
    Ok(Summary {
        messages,
        bytes,
        elapsed_s,
    })
}
