//! What a stream is asked for: where it starts and ends and whether it
//! confirms ([`StreamOptions`], the live relay or a replay), and the pgoutput
//! options sent with `START_REPLICATION` ([`pgoutput_options`]).

use crate::lsn::Lsn;

/// Where a stream starts and ends, and what it confirms. The defaults are the
/// live relay: from the slot's confirmed position, forever, confirming.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Start here instead of at the slot's confirmed position. Must not be
    /// below it (PostgreSQL cannot rewind a logical slot); above it, every
    /// transaction committing in between is skipped for good.
    pub start_lsn: Option<Lsn>,
    /// Stop once every transaction committing below this position is
    /// acknowledged (replay).
    pub end_lsn: Option<Lsn>,
    /// Confirm progress to PostgreSQL. `false` leaves the slot where it is
    /// (a kept bookmark can be replayed again).
    pub confirm: bool,
    /// Value of the `replay` header on every record (replay).
    pub replay_header: Option<String>,
    /// Send every record to this topic instead of the mapped one (replay).
    pub topic_override: Option<String>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            start_lsn: None,
            end_lsn: None,
            confirm: true,
            replay_header: None,
            topic_override: None,
        }
    }
}

/// Which pgoutput options to send, from the server version. Streaming stays
/// off on purpose: streamed in-progress transactions would have to be
/// buffered until commit (unbounded) or published before commit (a rolled
/// back transaction's rows would reach Kafka). Without it the server spills
/// big transactions to disk and sends them after commit, which the bounded
/// window streams through.
///
/// With `messages`, pgoutput also sends logical decoding messages
/// (`pg_logical_emit_message`); transactional ones inside their transaction.
pub fn pgoutput_options(
    server_version_num: u32,
    publication: &str,
    messages: bool,
) -> Vec<(String, String)> {
    let mut opts = vec![
        ("proto_version".to_string(), "1".to_string()),
        (
            "publication_names".to_string(),
            format!("\"{}\"", publication.replace('"', "\"\"")),
        ),
    ];
    if messages {
        opts.push(("messages".to_string(), "true".to_string()));
    }
    if server_version_num >= 160000 {
        // Relay rows whatever their replication origin (the default, said out loud).
        opts.push(("origin".to_string(), "any".to_string()));
    }
    opts
}
