//! The markdown report, and the targets of issue 13 checked against the figures.

use std::fmt::Write as _;

use crate::results::{CatchUpRun, Results, Target, Window};

/// Peak RSS limit of the targets, MiB.
const RSS_LIMIT_MIB: f64 = 64.0;

/// Checks the targets of issue 13 against the figures (reached in the
/// benchmark, never asserted in tests).
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    for c in &r.catch_up {
        let which = if c.ceiling.what == c.ceiling_rust_client.what {
            "Rust client"
        } else {
            "pg_recvlogical"
        };
        out.push(Target {
            what: format!("catch-up, {}, {}", c.broker, c.shape()),
            target: "≥ 0.8 × ceiling".into(),
            measured: format!(
                "{:.2} × ({:.0} vs {:.0} events/s, ceiling: {which})",
                c.relay_ratio_to_ceiling, c.relay.events_per_s, c.ceiling.events_per_s
            ),
            met: Some(c.relay_ratio_to_ceiling >= 0.8),
        });
        out.push(Target {
            what: format!("relay CPU per event, catch-up, {}, {}", c.broker, c.shape()),
            target: "≤ 1.5 × the raw producer's".into(),
            measured: format!(
                "{:.2} × ({:.2} vs {:.2} µs)",
                c.relay_cpu_ratio_to_raw,
                c.relay.process.cpu_per_event_us,
                c.raw_producer.process.cpu_per_event_us
            ),
            met: Some(c.relay_cpu_ratio_to_raw > 0.0 && c.relay_cpu_ratio_to_raw <= 1.5),
        });
    }
    for w in r
        .steady
        .iter()
        .filter(|w| w.subject == "relay@mock" && w.rows_per_txn == 1 && w.target_rate == 2000)
    {
        let mut measured = format!("{:.2} ms", w.latency.p99_ms);
        if !w.sustained {
            let _ = write!(measured, " (writers reached only {:.0}/s)", w.achieved_rate);
        }
        if w.missing > 0 {
            let _ = write!(measured, " ({} records missing)", w.missing);
        }
        out.push(Target {
            what: "p99 commit → consumer, 2k/s 1-row transactions, mock broker".into(),
            target: "≤ 10 ms".into(),
            measured,
            met: Some(w.latency.p99_ms <= 10.0 && w.missing == 0 && w.latency.samples > 0),
        });
        if let Some((_, st)) = w.stages.iter().find(|(k, _)| k == "relay") {
            out.push(Target {
                what: "… the relay stage's own p99 (read → handed to the producer)".into(),
                target: "≤ 1 ms".into(),
                measured: format!("{:.3} ms (p50 {:.3} ms)", st.p99_ms, st.p50_ms),
                met: Some(st.p99_ms <= 1.0 && st.samples > 0.0),
            });
        }
    }
    let mut rss: Vec<(String, f64)> = Vec::new();
    for c in &r.catch_up {
        if let Some(m) = c.relay.process.peak_rss_mib {
            rss.push((format!("catch-up {} × {}", c.broker, c.shape()), m));
        }
    }
    for w in r.steady.iter().filter(|w| w.subject.starts_with("relay")) {
        if let Some(m) = w.process.peak_rss_mib {
            rss.push((
                format!(
                    "{} {}k/s × {}",
                    w.subject,
                    w.target_rate / 1000,
                    w.rows_per_txn
                ),
                m,
            ));
        }
    }
    if let Some((worst, mib)) = rss.iter().max_by(|a, b| a.1.total_cmp(&b.1)).cloned() {
        out.push(Target {
            what: "relay peak RSS, every scenario".into(),
            target: format!("≤ {RSS_LIMIT_MIB} MiB"),
            measured: format!("max {mib:.1} MiB ({worst})"),
            met: Some(mib <= RSS_LIMIT_MIB),
        });
    }
    out
}

fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "n/a",
    }
}

fn opt_mib(v: Option<f64>) -> String {
    v.map(|m| format!("{m:.1}")).unwrap_or_else(|| "–".into())
}

pub fn markdown(r: &Results) -> String {
    let m = &r.meta;
    let mut s = String::new();
    let _ = writeln!(s, "# outbox-relay benchmark\n");
    let _ = writeln!(
        s,
        "Run {} ({}), {:.0} s in all, of which {:.0} s building the relay. `{}`\n",
        m.started_at,
        if m.quick { "quick" } else { "default" },
        m.total_elapsed_s,
        m.relay_build_s,
        m.command_line
    );
    let _ = writeln!(
        s,
        "Machine: {} cores, load average at start {}; shared with other work, so \
         figures are noisy (see \"other CPU\" below). {}; broker {} (memory storage); \
         relay `{}`.\n",
        m.cores, m.load_average_at_start, m.postgres_version, m.broker, m.relay_binary
    );

    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(s, "| target | goal | measured | met |\n|---|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.what,
            t.target,
            t.measured,
            yes_no(t.met)
        );
    }
    s.push('\n');

    if !r.catch_up.is_empty() {
        let _ = writeln!(s, "## 1. Catch-up\n");
        let _ = writeln!(
            s,
            "A backlog committed before anything streams; time until the last event is \
             acknowledged (relay: slot confirmed past the backlog, its start included; \
             pg_recvlogical and the Rust client: the end LSN reached; raw producer: last \
             delivery report). The ceiling is the faster of pg_recvlogical → /dev/null and the \
             benchmark's minimal client on the relay's replication code (reads and discards), \
             each on its own slot over the same WAL.\n"
        );
    }
    for c in &r.catch_up {
        let _ = writeln!(
            s,
            "### {} broker, {}\n\n{} events (~{} B payload, {:.1} MiB of \
             WAL, inserted in {:.1} s); relay start: {}.\n",
            c.broker,
            c.shape(),
            c.events,
            c.payload_bytes,
            c.wal_bytes as f64 / 1048576.0,
            c.backlog_insert_s,
            c.relay_startup_s
                .map(|t| format!("{t:.2} s to its \"streaming\" log line"))
                .unwrap_or_else(|| "unknown".into())
        );
        let _ = writeln!(
            s,
            "The relay's threads switched out {:.2} times per event waiting (wake-ups) and \
             were preempted {:.2} times per event.\n",
            c.relay_context_switches_per_event.0, c.relay_context_switches_per_event.1
        );
        let _ = writeln!(
            s,
            "| run | time (s) | events/s | × ceiling | process CPU (µs/event) | process peak RSS (MiB) | PostgreSQL CPU (µs/event) | broker CPU (µs/event) | machine busy | other CPU (s) |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        let ceiling = c.ceiling.events_per_s;
        for run in [
            &c.ceiling_pg_recvlogical,
            &c.ceiling_rust_client,
            &c.raw_producer,
            &c.relay,
        ] {
            catch_up_row(&mut s, run, ceiling);
        }
        let _ = match c.relay_records_verified {
            Some(n) => writeln!(
                s,
                "\nRelay records counted in Kafka afterwards: {n} of {}.\n",
                c.events
            ),
            None => writeln!(
                s,
                "\nRelay records not counted afterwards: the mock cluster keeps only the last \
                 5 MiB of a partition (the slot confirmed past the backlog, which the relay does \
                 only after every record before it was acknowledged).\n"
            ),
        };
    }

    if !r.steady.is_empty() {
        let _ = writeln!(s, "## 2–3. Steady rates: commit → consumer latency\n");
        let _ = writeln!(
            s,
            "Latency = consumer receive time − commit time (header `outbox-relay-commit-time`, \
             PostgreSQL's commit timestamp; the polling relay puts `pg_xact_commit_timestamp(xmin)` \
             there). Rows committed during a {:.0} s warm-up are excluded; windows last {:.0} s \
             ({:.0} s for pollers with intervals of a second or more). 1-row transactions come from \
             {} writers, {}-row transactions from {}. ⚠ marks a rate the writers could not sustain \
             on this machine (achieved < 95 % of target). `broker-floor` rows: a raw rdkafka \
             producer with the relay's settings paced at the rate, each record stamped with its \
             send time, read by the same consumer: the latency of producer → broker → consumer \
             alone.\n",
            m.warmup_s, m.window_s, m.slow_poll_window_s, m.writers, m.txn_rows, m.txn_writers
        );
        let _ = writeln!(
            s,
            "| subject | rows/txn | target/s | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms | samples | missing |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for w in &r.steady {
            latency_row(&mut s, w);
        }
        let relay: Vec<&Window> = r
            .steady
            .iter()
            .filter(|w| w.subject.starts_with("relay"))
            .collect();
        if relay.iter().any(|w| w.ack.is_some()) {
            let _ = writeln!(
                s,
                "\nThe relay's share, apart from the broker's: commit → broker acknowledgement \
                 measured inside the relay (its `outbox_relay_end_to_end_latency_seconds` \
                 histogram, read before the window and after the drain; percentiles interpolated \
                 within the 0.5/1/2.5/5/10/25 ms … buckets), beside the end-to-end p99, and the \
                 broker floor at the same rate: the paced raw producer's exact send → ack p99 \
                 (what tansu's produce path alone adds to the relay's ack latency) and its \
                 producer → consumer p99.\n"
            );
            let _ = writeln!(
                s,
                "| subject | rows/txn | rate/s | ack p50 ms | ack p99 ms | ack p99.9 ms | acked ≤ 10 ms | end-to-end p99 ms | floor send → ack p99 ms | floor producer → consumer p99 ms |\n|---|---|---|---|---|---|---|---|---|---|"
            );
            for w in &relay {
                let Some(a) = &w.ack else { continue };
                let floor_name = w.subject.replacen("relay", "broker-floor", 1);
                let floor = r
                    .steady
                    .iter()
                    .find(|f| f.subject == floor_name && f.target_rate == w.target_rate);
                let floor_ack = floor
                    .and_then(|f| f.ack.as_ref())
                    .map_or("–".to_string(), |a| format!("{:.2}", a.p99_ms));
                let floor = floor.map_or("–".to_string(), |f| format!("{:.2}", f.latency.p99_ms));
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} % | {:.2} | {} | {} |",
                    w.subject,
                    w.rows_per_txn,
                    w.target_rate,
                    a.p50_ms,
                    a.p99_ms,
                    a.p999_ms,
                    a.within_10ms_pct,
                    w.latency.p99_ms,
                    floor_ack,
                    floor
                );
            }
        }
        if relay.iter().any(|w| !w.stages.is_empty()) {
            let _ = writeln!(
                s,
                "\nWhere the relay windows' time goes, per record (the relay's \
                 `outbox_relay_stage_latency_seconds`, same interpolation; 50 µs … buckets): \
                 `server` = commit → XLogData read by the relay, `relay` = read → handed to the \
                 producer, `broker` = handed → acknowledged.\n"
            );
            let _ = writeln!(
                s,
                "| subject | rows/txn | rate/s | server p50 / p99 ms | relay p50 / p99 ms | broker p50 / p99 ms |\n|---|---|---|---|---|---|"
            );
            for w in &relay {
                let cell = |k: &str| {
                    w.stages
                        .iter()
                        .find(|(n, _)| n == k)
                        .map_or("–".to_string(), |(_, b)| {
                            format!("{:.3} / {:.3}", b.p50_ms, b.p99_ms)
                        })
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    w.subject,
                    w.rows_per_txn,
                    w.target_rate,
                    cell("server"),
                    cell("relay"),
                    cell("broker")
                );
            }
        }
        if !relay.is_empty() {
            let _ = writeln!(
                s,
                "\nWho is behind, in the relay windows: the relay's walsender sampled every 20 ms \
                 (`pg_stat_replication.wait_event`; `cpu` = decoding/sending, \
                 `WalSenderWaitForWAL` = caught up, waiting for commits, `WalSenderWriteData` = \
                 socket full: the relay is not reading fast enough), and the most WAL the walsender \
                 had not yet sent (decoding behind the writers).\n"
            );
            let _ = writeln!(
                s,
                "| subject | rows/txn | rate/s | walsender states | max unsent WAL (MiB) |\n|---|---|---|---|---|"
            );
            for w in relay {
                let states = w
                    .walsender
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0} %"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} |",
                    w.subject,
                    w.rows_per_txn,
                    w.target_rate,
                    states,
                    w.max_unsent_wal_bytes as f64 / 1048576.0
                );
            }
        }
        let _ = writeln!(s, "\n![latency plot](latency.png)\n");
        let _ = writeln!(
            s,
            "`latency.png`: p50 (thin line, circles), p99 (thick line, triangles) and, for the relay, \
             p99.9 (dashed, crosses) against the insert rate, log-log; blue = relay, orange = \
             polling every 100 ms, red = polling every 5 s, gray = broker floor (raw rdkafka producer \
             paced at the rate → tansu → the same consumer, no database: the part of every \
             latency that is not the relay's; the same series in both panels); one panel per \
             transaction shape.\n"
        );

        let _ = writeln!(s, "## 4. Resources per steady window\n");
        let _ = writeln!(
            s,
            "CPU over the measurement window, as % of one core and µs per event (relay/poller and \
             broker: per record that reached the consumer during the window; PostgreSQL and bench: \
             per row committed during the window); peak RSS (VmHWM) \
             of that window's relay, polling or producer process (each window starts a fresh one, \
             and a fresh broker). \
             PostgreSQL = postmaster and all backends (writers' inserts, walsender decoding or \
             polling queries, autovacuum). \"bench\" = this program's writers' client side and \
             consumer. \"other\" = CPU of processes outside the benchmark meanwhile.\n"
        );
        let _ = writeln!(
            s,
            "| subject | rows/txn | rate/s | relay/poller µs/event | relay/poller % core | peak RSS MiB | PostgreSQL % core | PostgreSQL µs/event | broker % core | bench % core | machine busy | other CPU (s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for w in &r.steady {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} % | {:.1} |",
                w.subject,
                w.rows_per_txn,
                w.target_rate,
                w.process.cpu_per_event_us,
                w.process.cpu_pct_of_core,
                opt_mib(w.process.peak_rss_mib),
                w.postgres.cpu_pct_of_core,
                w.postgres.cpu_per_event_us,
                w.broker.cpu_pct_of_core,
                w.bench.cpu_pct_of_core,
                w.machine.busy_pct,
                w.machine.others_cpu_s
            );
        }
        s.push('\n');
    }

    let _ = writeln!(s, "## Setup\n");
    let _ = writeln!(
        s,
        "- Relay: `{} {}` (defaults otherwise: in-flight window, linger.ms=1, idempotent producer, acks=all).",
        m.relay_binary,
        m.relay_args.join(" ")
    );
    let _ = writeln!(
        s,
        "- PostgreSQL settings: {}.",
        m.postgres_settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "- Consumer: rdkafka, fetch.wait.max.ms={}, reading each window's topic from the start.",
        m.consumer_fetch_wait_ms
    );
    let _ = writeln!(
        s,
        "- Everything (PostgreSQL, broker, relay, writers, consumer) shares {} cores, so \
         the benchmark measures the relay under contention, not in isolation.",
        m.cores
    );
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn catch_up_row(s: &mut String, run: &CatchUpRun, ceiling: f64) {
    let _ = writeln!(
        s,
        "| {} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.0} % | {:.1} |",
        run.what,
        run.elapsed_s,
        run.events_per_s,
        if ceiling > 0.0 {
            run.events_per_s / ceiling
        } else {
            0.0
        },
        run.process.cpu_per_event_us,
        opt_mib(run.process.peak_rss_mib),
        run.postgres.cpu_per_event_us,
        run.broker.cpu_per_event_us,
        run.machine.busy_pct,
        run.machine.others_cpu_s
    );
}

fn latency_row(s: &mut String, w: &Window) {
    let _ = writeln!(
        s,
        "| {} | {} | {} | {:.0}{} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
        w.subject,
        w.rows_per_txn,
        w.target_rate,
        w.achieved_rate,
        if w.sustained { "" } else { " ⚠" },
        w.latency.p50_ms,
        w.latency.p99_ms,
        w.latency.p999_ms,
        w.latency.max_ms,
        w.latency.samples,
        w.missing
    );
}
