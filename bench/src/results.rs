//! Every figure the benchmark produces; serialised as-is to `results.json`
//! and rendered by `report` and `plot`.

use serde::Serialize;

use crate::load::Latency;

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub meta: Meta,
    /// One per broker and backlog shape.
    pub catch_up: Vec<CatchUp>,
    /// Steady-rate windows, relay and polling baselines alike.
    pub steady: Vec<Window>,
    /// Things the reader must know (unsustained rates, missing records, ...).
    pub notes: Vec<String>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Default, Serialize)]
pub struct Meta {
    pub started_at: String,
    pub command_line: String,
    pub quick: bool,
    pub cores: usize,
    pub load_average_at_start: String,
    pub postgres_version: String,
    pub postgres_settings: Vec<(String, String)>,
    pub broker: String,
    pub relay_binary: String,
    /// Seconds spent building the relay before the run (0 with --relay-bin).
    pub relay_build_s: f64,
    pub relay_args: Vec<String>,
    pub events: u64,
    pub payload_bytes: usize,
    pub backlog_txn_rows: Vec<usize>,
    pub rates: Vec<u64>,
    pub warmup_s: f64,
    pub window_s: f64,
    pub slow_poll_window_s: f64,
    pub writers: usize,
    pub txn_writers: usize,
    pub txn_rows: usize,
    pub consumer_fetch_wait_ms: u32,
    pub total_elapsed_s: f64,
}

/// CPU and memory of one process (or process tree) over one measurement.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub cpu_s: f64,
    /// CPU as a share of one core over the measurement, in percent.
    pub cpu_pct_of_core: f64,
    /// CPU per event, µs.
    pub cpu_per_event_us: f64,
    /// Peak RSS (VmHWM) in MiB, for single processes.
    pub peak_rss_mib: Option<f64>,
}

impl Usage {
    pub fn new(cpu_s: f64, wall_s: f64, events: u64, peak_rss_kb: Option<u64>) -> Usage {
        Usage {
            cpu_s,
            cpu_pct_of_core: if wall_s > 0.0 {
                100.0 * cpu_s / wall_s
            } else {
                0.0
            },
            cpu_per_event_us: if events > 0 {
                cpu_s * 1e6 / events as f64
            } else {
                0.0
            },
            peak_rss_mib: peak_rss_kb.map(|kb| kb as f64 / 1024.0),
        }
    }
}

/// What the whole machine did meanwhile (the benchmark shares it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineUsage {
    /// Busy share of all cores, percent.
    pub busy_pct: f64,
    /// CPU seconds of processes outside the benchmark (other developers' builds...).
    pub others_cpu_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct CatchUp {
    /// `tansu` or `mock`.
    pub broker: String,
    pub events: u64,
    pub payload_bytes: usize,
    pub txn_rows: usize,
    /// What the backlog is made of: `rows` of the outbox table or
    /// `messages` (`pg_logical_emit_message`).
    pub source: String,
    pub backlog_insert_s: f64,
    pub wal_bytes: u64,
    /// The faster of the two below: what the server can send at all.
    pub ceiling: CatchUpRun,
    pub ceiling_pg_recvlogical: CatchUpRun,
    /// The bench's minimal client on the relay's replication code, reading
    /// and discarding the same stream.
    pub ceiling_rust_client: CatchUpRun,
    pub raw_producer: CatchUpRun,
    pub relay: CatchUpRun,
    /// Relay events/s divided by the pg_recvlogical ceiling's.
    pub relay_ratio_to_ceiling: f64,
    /// Relay CPU per event divided by the raw producer's.
    pub relay_cpu_ratio_to_raw: f64,
    /// Seconds from the relay's start to its "streaming" log line.
    pub relay_startup_s: Option<f64>,
    /// The relay's context switches per event over the catch-up (all its
    /// threads, start included): voluntary (wake-ups), involuntary (preempted).
    pub relay_context_switches_per_event: (f64, f64),
    /// Records of the relay's topic, counted by consuming it afterwards;
    /// `None` on the mock broker, which keeps only the last 5 MiB (or 100,000
    /// records) of a partition.
    pub relay_records_verified: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CatchUpRun {
    pub what: String,
    pub elapsed_s: f64,
    pub events_per_s: f64,
    /// The process under test (pg_recvlogical, raw producer, relay).
    pub process: Usage,
    pub postgres: Usage,
    pub broker: Usage,
    pub machine: MachineUsage,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    /// `relay`, `poll-100ms`, `poll-5s`, `broker-floor`; `…@mock` on the mock
    /// broker.
    pub subject: String,
    /// `tansu` or `mock`.
    pub broker_kind: String,
    pub rows_per_txn: usize,
    pub writers: usize,
    pub target_rate: u64,
    pub achieved_rate: f64,
    /// Writers reached ≥ 95 % of the target rate.
    pub sustained: bool,
    pub max_writer_delay_ms: f64,
    pub rows_total: u64,
    pub received: u64,
    pub missing: u64,
    pub latency: Latency,
    /// The relay or polling process.
    pub process: Usage,
    pub postgres: Usage,
    pub broker: Usage,
    /// The benchmark process itself (writers' client side, consumer).
    pub bench: Usage,
    pub machine: MachineUsage,
    /// Relay windows: what the relay's walsender was doing, sampled every
    /// 20 ms over the window (`pg_stat_replication.wait_event`, "cpu" when
    /// none): `WalSenderWriteData` = the relay is not reading fast enough,
    /// `WalSenderWaitForWAL` = the relay is caught up.
    pub walsender: Vec<(String, f64)>,
    /// Largest `pg_current_wal_lsn() - sent_lsn` seen: WAL the walsender had
    /// not sent yet (decoding behind).
    pub max_unsent_wal_bytes: u64,
    /// Commit → broker acknowledgement: relay windows from the relay's own
    /// latency histogram (its share, without the consumer path); broker-floor
    /// windows the paced producer's exact send → ack (the broker's part).
    pub ack: Option<BucketLatency>,
    /// Relay windows: the same records' stages from the relay's
    /// `outbox_relay_stage_latency_seconds` (server, relay, broker).
    pub stages: Vec<(String, BucketLatency)>,
}

/// Percentiles estimated from the deltas of a cumulative histogram (linear
/// inside a bucket, so as coarse as the buckets: 0.5, 1, 2.5, 5, 10, 25 ms …).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BucketLatency {
    pub samples: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Share of records acknowledged within 10 ms of their commit, %.
    pub within_10ms_pct: f64,
}

impl BucketLatency {
    /// From two scrapes of the same histogram: `(upper bound s, cumulative count)`.
    pub fn between(a: &[(f64, f64)], b: &[(f64, f64)]) -> BucketLatency {
        let cum: Vec<(f64, f64)> = b
            .iter()
            .map(|&(le, nb)| {
                let na = a.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
                (le, (nb - na).max(0.0))
            })
            .collect();
        let total = cum.last().map_or(0.0, |x| x.1);
        let quantile = |q: f64| -> f64 {
            if total <= 0.0 {
                return 0.0;
            }
            let target = q * total;
            let (mut lo, mut below) = (0.0, 0.0);
            for &(le, n) in &cum {
                if n >= target {
                    if !le.is_finite() {
                        return lo * 1000.0; // beyond the last bound: its floor
                    }
                    let frac = if n > below {
                        (target - below) / (n - below)
                    } else {
                        1.0
                    };
                    return (lo + (le - lo) * frac) * 1000.0;
                }
                lo = le;
                below = n;
            }
            lo * 1000.0
        };
        let within = cum
            .iter()
            .find(|x| (x.0 - 0.01).abs() < 1e-9)
            .map_or(0.0, |x| x.1);
        BucketLatency {
            samples: total,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            p999_ms: quantile(0.999),
            within_10ms_pct: if total > 0.0 {
                100.0 * within / total
            } else {
                0.0
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

impl CatchUp {
    /// "1000 row(s)/txn", "1 message(s)/txn": the backlog's shape, for labels.
    pub fn shape(&self) -> String {
        let unit = if self.source == "messages" {
            "message"
        } else {
            "row"
        };
        format!("{} {unit}(s)/txn", self.txn_rows)
    }
}

#[cfg(test)]
mod tests {
    use super::BucketLatency;

    #[test]
    fn bucket_percentiles_come_from_the_window_only() {
        // Before the window: 100 records, all within 1 ms.
        let a = [
            (0.001, 100.0),
            (0.01, 100.0),
            (0.1, 100.0),
            (f64::INFINITY, 100.0),
        ];
        // During it: 90 more within 1 ms, 9 in (1, 10] ms, 1 in (10, 100] ms.
        let b = [
            (0.001, 190.0),
            (0.01, 199.0),
            (0.1, 200.0),
            (f64::INFINITY, 200.0),
        ];
        let l = BucketLatency::between(&a, &b);
        assert_eq!(l.samples, 100.0);
        assert!((l.within_10ms_pct - 99.0).abs() < 1e-9, "{l:?}");
        // p50: 50 of 90 into the first bucket.
        assert!((l.p50_ms - 50.0 / 90.0).abs() < 1e-9, "{l:?}");
        // p99: the 99th record is the last of the (1, 10] ms bucket.
        assert!((l.p99_ms - 10.0).abs() < 1e-9, "{l:?}");
        // p99.9 lies in (10, 100] ms: 0.9 of the way through it.
        assert!((l.p999_ms - 91.0).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn beyond_the_last_bound_reports_its_floor_and_empty_is_zero() {
        let a = [(0.01, 0.0), (f64::INFINITY, 0.0)];
        let b = [(0.01, 0.0), (f64::INFINITY, 5.0)];
        assert_eq!(BucketLatency::between(&a, &b).p99_ms, 10.0);
        let empty = BucketLatency::between(&a, &a);
        assert_eq!((empty.samples, empty.p99_ms), (0.0, 0.0));
    }
}
