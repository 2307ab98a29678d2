//! The chaos checker: every committed outbox row against what the topics hold.
//!
//! - zero missing: every committed row was delivered at least once;
//! - nothing extra: every record is a committed row (rolled-back rows never appear);
//! - every delivery of a row (duplicates included) carries the row's `id`, key, topic,
//!   commit LSN and an intact payload;
//! - per key, first deliveries follow commit order: by the writer's seq for keys one
//!   writer owns (ground truth from the test), by the commit LSN header for shared
//!   keys; the header itself is checked against each writer's transaction order;
//! - a key lives in one partition.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::load::{pad_for, MARKER_WRITER};
use crate::harness::{lsn_to_u64, unique_name};

/// How many examples of each kind of problem are listed.
const EXAMPLES: usize = 8;
/// The topics are read until this long after the last record once every row is in.
const IDLE_AFTER_COMPLETE: Duration = Duration::from_secs(2);

/// One committed row, as the table holds it.
#[derive(Clone, Debug)]
pub struct ExpectedRow {
    pub id: String,
    pub topic: String,
    pub key: String,
    pub writer: u32,
    pub seq: u64,
    pub txn: u64,
    /// Bytes of `payload::text`, which is what the record's value must be.
    pub payload_len: usize,
}

/// Every row of the outbox table, by uid.
pub async fn read_expected(client: &tokio_postgres::Client) -> HashMap<String, ExpectedRow> {
    client
        .query(
            "SELECT payload->>'uid', id::text, aggregatetype, aggregateid, \
                    (payload->>'w')::int, (payload->>'seq')::bigint, (payload->>'txn')::bigint, \
                    octet_length(payload::text) \
             FROM outbox_events",
            &[],
        )
        .await
        .expect("read the outbox table")
        .into_iter()
        .map(|r| {
            let uid: String = r.get(0);
            let row = ExpectedRow {
                id: r.get(1),
                topic: format!("outbox.event.{}", r.get::<_, String>(2)),
                key: r.get(3),
                writer: r.get::<_, i32>(4) as u32,
                seq: r.get::<_, i64>(5) as u64,
                txn: r.get::<_, i64>(6) as u64,
                payload_len: r.get::<_, i32>(7) as usize,
            };
            (uid, row)
        })
        .collect()
}

/// One record read back, reduced to what the checks need.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// From the payload; `None` when the payload is not the JSON a writer wrote.
    pub uid: Option<String>,
    pub id: Option<String>,
    pub commit_lsn: Option<u64>,
    pub payload_len: usize,
    /// The padding matches the one derived from the uid.
    pub pad_ok: bool,
}

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'a>, name: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn reduce(m: &rdkafka::message::BorrowedMessage<'_>) -> Delivery {
    let payload = m.payload().unwrap_or_default();
    let json: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
    let uid = json
        .as_ref()
        .and_then(|j| j.get("uid"))
        .and_then(|u| u.as_str())
        .map(str::to_string);
    let pad_ok = match (&uid, json.as_ref().and_then(|j| j.get("pad"))) {
        (Some(uid), Some(serde_json::Value::String(pad))) => *pad == pad_for(uid, pad.len()),
        _ => false,
    };
    Delivery {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        uid,
        id: header(m, "id"),
        commit_lsn: header(m, "outbox-relay-commit-lsn")
            .filter(|l| l.contains('/'))
            .map(|l| lsn_to_u64(&l)),
        payload_len: payload.len(),
        pad_ok,
    }
}

/// Reads every partition of `topics` from the beginning until every uid of
/// `expected` was seen and nothing more arrived for a moment, or `timeout` passed.
/// Counts by consuming, never by watermarks (tansu's are not to be trusted).
pub fn consume_all(
    bootstrap: &str,
    topics: &[String],
    expected: &HashSet<String>,
    timeout: Duration,
) -> Vec<Delivery> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("chaos_check"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", "100")
        .set("max.partition.fetch.bytes", "4194304")
        .create()
        .expect("create the checker's consumer");
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let partitions = loop {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
            let ids: Vec<i32> = md
                .map(|md| {
                    md.topics()
                        .iter()
                        .filter(|t| t.name() == topic && t.error().is_none())
                        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                        .collect()
                })
                .unwrap_or_default();
            if !ids.is_empty() {
                break ids;
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} does not exist (the relay never created it)"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        for p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("add a partition to the assignment");
        }
    }
    consumer.assign(&tpl).expect("assign partitions");

    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut last_record = Instant::now();
    loop {
        let complete = seen.len() >= expected.len();
        if complete && last_record.elapsed() >= IDLE_AFTER_COMPLETE {
            return out;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "[chaos] consuming stopped at the deadline with {} of {} rows seen",
                seen.len(),
                expected.len()
            );
            return out;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let d = reduce(&m);
                if let Some(uid) = &d.uid {
                    if expected.contains(uid) && !seen.contains(uid) {
                        seen.insert(uid.clone());
                    }
                }
                out.push(d);
                last_record = Instant::now();
            }
            Some(Err(e)) if e.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) => {
                eprintln!("[chaos] consume: {e}");
            }
            Some(Err(_)) => {}
        }
    }
}

/// Problems of one kind: a count and the first few examples.
#[derive(Debug, Default)]
pub struct Problems {
    pub count: usize,
    pub examples: Vec<String>,
}

impl Problems {
    fn add(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what());
        }
    }
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub rows: usize,
    pub deliveries: usize,
    pub duplicates: usize,
    /// Committed rows never delivered.
    pub missing: Problems,
    /// Records that are no committed row (rolled back, unknown, unparsable).
    pub phantoms: Problems,
    /// A delivery whose id header, key, topic or payload differ from the row's.
    pub mismatches: Problems,
    /// Deliveries of one row with different commit LSN headers, or rows of one
    /// transaction with different ones, or a writer's transactions out of LSN order.
    pub provenance: Problems,
    /// First deliveries of a key out of commit order, or a key in two partitions.
    pub order: Problems,
    /// The commit LSN (header) of each delivered row.
    pub commit_lsn: HashMap<String, u64>,
}

impl Verdict {
    /// Every problem kind with its examples, for the failure message.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, p) in [
            ("missing rows", &self.missing),
            ("records that are no committed row", &self.phantoms),
            ("deliveries differing from their row", &self.mismatches),
            ("commit LSN header problems", &self.provenance),
            ("per-key order problems", &self.order),
        ] {
            if p.count > 0 {
                out.push(format!(
                    "{} {name}, e.g.:\n    {}",
                    p.count,
                    p.examples.join("\n    ")
                ));
            }
        }
        out
    }
}

/// Compares `deliveries` with `expected`. `rolled_back` are uids whose transaction
/// rolled back (named as such when they show up).
pub fn check(
    expected: &HashMap<String, ExpectedRow>,
    rolled_back: &HashSet<String>,
    deliveries: &[Delivery],
) -> Verdict {
    let mut v = Verdict {
        rows: expected.len(),
        deliveries: deliveries.len(),
        ..Verdict::default()
    };
    let mut sorted: Vec<&Delivery> = deliveries.iter().collect();
    sorted.sort_by(|a, b| {
        (a.topic.as_str(), a.partition, a.offset).cmp(&(b.topic.as_str(), b.partition, b.offset))
    });

    let mut first_seen: HashSet<&str> = HashSet::new();
    let mut key_partition: HashMap<(&str, &str), i32> = HashMap::new();
    // Per (topic, key): the last first delivery (commit LSN, writer, seq).
    let mut last: HashMap<(&str, &str), (u64, u32, u64)> = HashMap::new();
    for d in &sorted {
        let Some(uid) = d.uid.as_deref() else {
            v.phantoms.add(|| {
                format!(
                    "{}[{}]@{}: payload is not a writer's JSON",
                    d.topic, d.partition, d.offset
                )
            });
            continue;
        };
        let Some(row) = expected.get(uid) else {
            let why = if rolled_back.contains(uid) {
                "its transaction rolled back"
            } else {
                "no such committed row"
            };
            v.phantoms
                .add(|| format!("{uid} at {}[{}]@{}: {why}", d.topic, d.partition, d.offset));
            continue;
        };
        if d.id.as_deref() != Some(row.id.as_str())
            || d.key.as_deref() != Some(row.key.as_str())
            || d.topic != row.topic
            || d.payload_len != row.payload_len
            || !d.pad_ok
        {
            v.mismatches.add(|| {
                format!(
                    "{uid} at {}[{}]@{}: id {:?} (row {}), key {:?} (row {}), topic (row {}), \
                     payload {} bytes (row {}), padding intact: {}",
                    d.topic,
                    d.partition,
                    d.offset,
                    d.id,
                    row.id,
                    d.key,
                    row.key,
                    row.topic,
                    d.payload_len,
                    row.payload_len,
                    d.pad_ok
                )
            });
        }
        let Some(lsn) = d.commit_lsn else {
            v.provenance.add(|| format!("{uid}: no commit LSN header"));
            continue;
        };
        match v.commit_lsn.get(uid) {
            Some(&first) if first != lsn => v
                .provenance
                .add(|| format!("{uid}: delivered with commit LSN {lsn:X} and {first:X}")),
            Some(_) => {}
            None => {
                v.commit_lsn.insert(uid.to_string(), lsn);
            }
        }
        let key = (row.topic.as_str(), row.key.as_str());
        match key_partition.get(&key) {
            Some(&p) if p != d.partition => v
                .order
                .add(|| format!("key {key:?} in partitions {p} and {}", d.partition)),
            Some(_) => {}
            None => {
                key_partition.insert(key, d.partition);
            }
        }
        if !first_seen.insert(uid) {
            v.duplicates += 1;
            continue;
        }
        let owned = row.key.starts_with('w') && row.writer != MARKER_WRITER;
        let this = (lsn, row.writer, row.seq);
        if let Some(&prev) = last.get(&key) {
            let in_order = if owned {
                // Ground truth: one writer, commits in seq order.
                row.seq > prev.2
            } else {
                lsn > prev.0 || (lsn == prev.0 && row.writer == prev.1 && row.seq > prev.2)
            };
            if !in_order {
                v.order.add(|| {
                    format!(
                        "key {key:?}: {uid} (commit {lsn:X}, writer {}, seq {}) delivered first after \
                         writer {} seq {} (commit {:X}) at {}[{}]@{}",
                        row.writer, row.seq, prev.1, prev.2, prev.0, d.topic, d.partition, d.offset
                    )
                });
            }
        }
        last.insert(key, this);
    }

    for (uid, row) in expected {
        if !first_seen.contains(uid.as_str()) {
            v.missing
                .add(|| format!("{uid} (id {}, {} key {})", row.id, row.topic, row.key));
        }
    }
    if v.missing.count > 0 {
        // Sorted examples read better.
        v.missing.examples.sort();
    }

    // The commit LSN header against each writer's own commit order: one LSN per
    // transaction, strictly increasing from one transaction to the next.
    let mut per_txn: BTreeMap<(u32, u64), (u64, &str)> = BTreeMap::new();
    for (uid, row) in expected {
        let Some(&lsn) = v.commit_lsn.get(uid) else {
            continue;
        };
        match per_txn.get(&(row.writer, row.txn)) {
            Some(&(other, other_uid)) if other != lsn => v.provenance.add(|| {
                format!(
                    "writer {} txn {}: {uid} has commit LSN {lsn:X}, {other_uid} has {other:X}",
                    row.writer, row.txn
                )
            }),
            Some(_) => {}
            None => {
                per_txn.insert((row.writer, row.txn), (lsn, uid));
            }
        }
    }
    let mut prev: Option<((u32, u64), u64)> = None;
    for (&(writer, txn), &(lsn, _)) in &per_txn {
        if let Some(((pw, ptxn), plsn)) = prev {
            if pw == writer && plsn >= lsn {
                v.provenance.add(|| {
                    format!(
                        "writer {writer}: txn {txn} has commit LSN {lsn:X}, not above txn {ptxn}'s {plsn:X}"
                    )
                });
            }
        }
        prev = Some(((writer, txn), lsn));
    }
    v
}

/// Where the duplicates came from: each fault's window of commit positions (from
/// the lowest position the slot held around the fault to the WAL written by its
/// end) against the commit LSN of every extra delivery.
#[derive(Debug, Default)]
pub struct DuplicateSources {
    /// Extra deliveries charged to each fault, in the order of `windows`.
    pub per_fault: Vec<usize>,
    /// Extra deliveries whose commit lies in no fault's window: re-sent while no
    /// fault was going on (should stay 0).
    pub outside: usize,
}

/// Charges every extra delivery of a row (deliveries beyond its first) to the
/// faults whose window holds the row's commit, the latest fault first, one extra
/// delivery each (a PostgreSQL crash can rewind the slot over earlier faults'
/// windows, so a row may be re-sent by several); what no window holds is
/// `outside`. `windows[i]` is `(low, high)`, both inclusive.
pub fn duplicate_sources(deliveries: &[Delivery], windows: &[(u64, u64)]) -> DuplicateSources {
    let mut count: HashMap<&str, (usize, u64)> = HashMap::new();
    for d in deliveries {
        if let (Some(uid), Some(lsn)) = (d.uid.as_deref(), d.commit_lsn) {
            count.entry(uid).or_insert((0, lsn)).0 += 1;
        }
    }
    let mut out = DuplicateSources {
        per_fault: vec![0; windows.len()],
        outside: 0,
    };
    for &(n, lsn) in count.values() {
        let mut extra = n.saturating_sub(1);
        for (i, &(lo, hi)) in windows.iter().enumerate().rev() {
            if extra == 0 {
                break;
            }
            if lo <= lsn && lsn <= hi {
                out.per_fault[i] += 1;
                extra -= 1;
            }
        }
        out.outside += extra;
    }
    out
}

#[cfg(test)]
mod duplicate_sources_tests {
    use super::*;

    fn d(uid: &str, lsn: u64) -> Delivery {
        Delivery {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            uid: Some(uid.into()),
            id: None,
            commit_lsn: Some(lsn),
            payload_len: 0,
            pad_ok: true,
        }
    }

    #[test]
    fn extra_deliveries_go_to_the_latest_faults_holding_the_commit() {
        let deliveries = [
            d("a", 10),
            d("a", 10),
            d("a", 10), // twice extra: both windows hold 10
            d("b", 25),
            d("b", 25), // once extra: only the second window
            d("c", 50),
            d("c", 50), // no window
            d("e", 12), // once: no duplicate
        ];
        let s = duplicate_sources(&deliveries, &[(5, 20), (0, 30)]);
        assert_eq!(s.per_fault, vec![1, 2]);
        assert_eq!(s.outside, 1);
    }
}
