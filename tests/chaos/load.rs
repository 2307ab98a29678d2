//! The chaos load: writer tasks committing outbox rows through every fault.
//!
//! Every row carries a client-generated unique id (`uid`, `w<writer>-<seq>`) in its
//! payload, with a unique index on it. When a commit's outcome is unknown (the
//! connection broke during the transaction, e.g. PostgreSQL was restarted), the
//! writer reconnects and looks the transaction's first uid up: present means it
//! committed (all rows or none), absent means it did not, and only then is it sent
//! again, with the same uids. So the writers' ledgers hold exactly the committed
//! rows, and the checker can compare them with the table.
//!
//! Keys: each writer owns a few keys (`w<writer>-k<n>`), so their commit order is the
//! writer's seq order (ground truth, independent of the relay); a few keys are
//! `shared-<n>`, written by every writer, whose order is checked with the commit LSN.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The aggregate types: one topic each (`outbox.event.<aggregate>`).
pub const AGGREGATES: [&str; 4] = ["Order", "Customer", "Payment", "Shipment"];
/// Keys every writer writes.
pub const SHARED_KEYS: usize = 3;
/// Keys each writer owns.
pub const OWNED_KEYS: usize = 6;
/// The writer number of the chaos driver's marker rows (one key, one per hang).
pub const MARKER_WRITER: u32 = 1000;
pub const MARKER_KEY: &str = "chaos-marker";
pub const MARKER_AGGREGATE: &str = "Order";

/// The outbox table plus the unique index writers rely on.
pub const UID_INDEX_SQL: &str =
    "CREATE UNIQUE INDEX IF NOT EXISTS outbox_events_uid ON outbox_events ((payload->>'uid'))";

/// How a writer behaves.
#[derive(Clone, Debug)]
pub struct LoadShape {
    /// Pause between two transactions of one writer, in ms (uniform).
    pub pause_ms: (u64, u64),
    /// Share of transactions that end in ROLLBACK (their rows must never show up).
    pub rollback_share: f64,
}

/// One row a writer inserted.
#[derive(Clone, Debug)]
pub struct RowSpec {
    pub uid: String,
    pub seq: u64,
    pub aggregate: &'static str,
    pub key: String,
}

/// One committed transaction.
#[derive(Clone, Debug)]
pub struct TxnSpec {
    pub rows: Vec<RowSpec>,
}

/// What one writer did.
#[derive(Debug, Default)]
pub struct Ledger {
    pub committed: Vec<TxnSpec>,
    /// Uids of rolled-back transactions.
    pub rolled_back: Vec<String>,
    /// Transactions whose outcome was unknown after an error.
    pub in_doubt: u64,
    /// ... of which had committed (found by uid).
    pub in_doubt_committed: u64,
    /// Transactions sent again after an error proved they had not committed.
    pub retried: u64,
    /// Connection errors seen (connect or query).
    pub errors: u64,
}

/// Shared progress counters (rows committed by all writers).
#[derive(Debug, Default)]
pub struct Progress {
    pub rows: AtomicU64,
    pub txns: AtomicU64,
}

/// The deterministic padding of a row: `len` alphanumeric characters derived from
/// its uid, so the checker can verify the payload without keeping it.
pub fn pad_for(uid: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // FNV-1a of the uid seeds a xorshift64*.
    let mut x = uid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ALPHABET[(r >> 58) as usize % ALPHABET.len()] as char
        })
        .collect()
}

/// Transaction sizes 1..=50: mostly small, some medium, a few large.
fn txn_size(rng: &mut StdRng) -> usize {
    match rng.gen_range(0..100) {
        0..=49 => rng.gen_range(1..=3),
        50..=84 => rng.gen_range(4..=15),
        _ => rng.gen_range(16..=50),
    }
}

/// Payload padding: mostly small, some kilobytes, a few large enough to be TOASTed
/// out of line.
fn pad_len(rng: &mut StdRng) -> usize {
    match rng.gen_range(0..100) {
        0..=89 => rng.gen_range(0..=100),
        90..=98 => rng.gen_range(100..=3000),
        _ => rng.gen_range(3000..=20000),
    }
}

/// The JSON payload of a row (as text; PostgreSQL re-renders it as jsonb).
pub fn payload_json(uid: &str, writer: u32, seq: u64, txn: u64, pad_len: usize) -> String {
    format!(
        r#"{{"uid": "{uid}", "w": {writer}, "seq": {seq}, "txn": {txn}, "note": "café ☕ \"q\" \\ 日本", "pad": "{}"}}"#,
        pad_for(uid, pad_len)
    )
}

/// One INSERT of `rows` (VALUES order is insertion order, so WAL order).
pub fn insert_sql(writer: u32, txn: u64, rows: &[(RowSpec, usize)]) -> String {
    let mut sql = String::from(
        "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) VALUES ",
    );
    for (i, (row, pad)) in rows.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        let payload = payload_json(&row.uid, writer, row.seq, txn, *pad);
        sql.push_str(&format!(
            "('{}', '{}', '{}Happened', '{}')",
            row.aggregate,
            row.key,
            row.aggregate,
            payload.replace('\'', "''")
        ));
    }
    sql
}

/// Connection trouble (retry) as opposed to a bug in the test (fail).
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // 08: connection exception; 57: operator intervention (shutdown, crash,
        // "the database system is starting up"); 53: insufficient resources.
        Some(code) => matches!(code.code().get(..2), Some("08" | "57" | "53")),
        None => true,
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A writer's connection, re-established as often as it takes.
struct Conn {
    url: String,
    client: Option<tokio_postgres::Client>,
    errors: u64,
}

impl Conn {
    async fn get(&mut self) -> &tokio_postgres::Client {
        let mut delay = Duration::from_millis(50);
        while self.client.is_none() {
            match tokio::time::timeout(Duration::from_secs(5), connect(&self.url)).await {
                Ok(Ok(c)) => self.client = Some(c),
                Ok(Err(e)) => {
                    assert!(is_transient(&e), "writer cannot connect: {e}");
                    self.errors += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(_) => {
                    self.errors += 1;
                }
            }
        }
        self.client.as_ref().expect("connected above")
    }

    fn broken(&mut self, e: &tokio_postgres::Error, what: &str) {
        assert!(is_transient(e), "writer {what} failed unexpectedly: {e}");
        self.errors += 1;
        self.client = None;
    }
}

/// Did the transaction whose first uid is `uid` commit? Asks until it gets an answer.
async fn committed(conn: &mut Conn, uid: &str) -> bool {
    loop {
        let client = conn.get().await;
        match client
            .query_opt(
                "SELECT 1 FROM outbox_events WHERE payload->>'uid' = $1",
                &[&uid],
            )
            .await
        {
            Ok(row) => return row.is_some(),
            Err(e) => conn.broken(&e, "commit check"),
        }
    }
}

/// One writer: commits transactions until `stop`, through every outage.
pub async fn writer(
    writer: u32,
    url: String,
    seed: u64,
    shape: LoadShape,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Ledger {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conn = Conn {
        url,
        client: None,
        errors: 0,
    };
    let mut ledger = Ledger::default();
    let mut seq = 0u64;
    let mut txn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = txn_size(&mut rng);
        let rows: Vec<(RowSpec, usize)> = (0..n as u64)
            .map(|i| {
                let (aggregate, key) = if rng.gen_bool(0.15) {
                    let k = rng.gen_range(0..SHARED_KEYS);
                    (AGGREGATES[k % AGGREGATES.len()], format!("shared-{k}"))
                } else {
                    let k = rng.gen_range(0..OWNED_KEYS);
                    (
                        AGGREGATES[(k + writer as usize) % AGGREGATES.len()],
                        format!("w{writer}-k{k}"),
                    )
                };
                let seq = seq + i;
                let spec = RowSpec {
                    uid: format!("w{writer}-{seq}"),
                    seq,
                    aggregate,
                    key,
                };
                (spec, pad_len(&mut rng))
            })
            .collect();
        let rollback = rng.gen_bool(shape.rollback_share);
        let sql = format!(
            "BEGIN; {}; {}",
            insert_sql(writer, txn, &rows),
            if rollback { "ROLLBACK" } else { "COMMIT" }
        );
        let first_uid = rows[0].0.uid.clone();
        let outcome = loop {
            let client = conn.get().await;
            match client.batch_execute(&sql).await {
                Ok(()) => break !rollback,
                Err(e) => {
                    conn.broken(&e, "transaction");
                    if rollback {
                        break false; // never committed, whatever happened
                    }
                    ledger.in_doubt += 1;
                    if committed(&mut conn, &first_uid).await {
                        ledger.in_doubt_committed += 1;
                        break true;
                    }
                    ledger.retried += 1;
                }
            }
        };
        let rows: Vec<RowSpec> = rows.into_iter().map(|(r, _)| r).collect();
        if outcome {
            progress
                .rows
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            progress.txns.fetch_add(1, Ordering::Relaxed);
            ledger.committed.push(TxnSpec { rows });
        } else {
            ledger.rolled_back.extend(rows.into_iter().map(|r| r.uid));
        }
        seq += n as u64;
        txn += 1;
        let pause = rng.gen_range(shape.pause_ms.0..=shape.pause_ms.1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    ledger.errors = conn.errors;
    ledger
}
