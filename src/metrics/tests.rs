use std::collections::BTreeSet;
use std::path::Path;
use std::time::UNIX_EPOCH;

use prometheus_parse::{LineInfo, Scrape, Value};

use super::*;

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("scrape parses")
}

/// Every line of `text` is a HELP, TYPE, UNIT or sample line, the text ends
/// with `# EOF`, and every sample belongs to a family declared before it.
fn assert_well_formed(text: &str) {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let mut declared: BTreeSet<String> = BTreeSet::new();
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        match LineInfo::parse(line) {
            LineInfo::Doc { .. } => {}
            LineInfo::Type {
                metric_name,
                metric_alias,
                ..
            } => {
                declared.insert(metric_alias.unwrap_or(metric_name));
            }
            LineInfo::Sample {
                metric_name, value, ..
            } => {
                let family = ["_total", "_bucket", "_sum", "_count", "_created"]
                    .iter()
                    .find_map(|s| {
                        metric_name
                            .strip_suffix(s)
                            .filter(|b| declared.contains(*b))
                    })
                    .unwrap_or(metric_name);
                assert!(
                    declared.contains(family),
                    "sample {metric_name} has no TYPE line before it"
                );
                assert!(
                    value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN",
                    "bad value in {line:?}"
                );
            }
            LineInfo::Empty | LineInfo::Ignored => panic!("unparseable line {line:?}"),
        }
    }
}

fn sample_value(scrape: &Scrape, metric: &str, label: Option<(&str, &str)>) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| match label {
            Some((k, v)) => s.labels.get(k) == Some(v),
            None => true,
        })
        .find_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[test]
fn names_are_unique_prefixed_and_follow_the_convention() {
    let unique: BTreeSet<_> = names::ALL.iter().collect();
    assert_eq!(unique.len(), names::ALL.len());
    for name in names::ALL {
        assert!(name.starts_with("outbox_relay_"), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name}"
        );
    }
    for h in names::HISTOGRAMS {
        assert!(names::ALL.contains(h));
    }
}

#[test]
fn encoding_names_every_metric_and_is_well_formed() {
    let m = Metrics::new();
    m.record_produced("orders", 100);
    m.record_acked(Duration::from_millis(3));
    m.delivery_error("msg_timed_out");
    m.dead_lettered("orders");
    m.server_identity("7420000000000000001", 1);
    m.bookmarks(&[crate::status::BookmarkSample {
        name: "b".into(),
        retained_bytes: 1,
        inactive_seconds: None,
    }]);
    let text = m.encode();
    assert_well_formed(&text);
    for name in names::ALL {
        let base = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {base} ")),
            "no TYPE line for {name}:\n{text}"
        );
    }
    assert!(text.contains("outbox_relay_reconnects_total 0"), "{text}");
    assert!(
        !text.contains("_total_total"),
        "counter suffix doubled:\n{text}"
    );
}

#[test]
fn values_show_up_in_the_scrape() {
    let m = Metrics::new();
    m.received_lsn(Lsn(0x300));
    m.sent_lsn(Lsn(0x280));
    m.acked_lsn(Lsn(0x250));
    m.confirmed_lsn(Lsn(0x200));
    m.record_produced("orders", 100);
    m.record_produced("orders", 50);
    m.record_produced("payments", 7);
    m.record_acked(Duration::from_micros(700));
    m.record_acked(Duration::from_secs(2));
    m.delivery_error("msg_timed_out");
    m.delivery_error("msg_timed_out");
    m.dead_lettered("payments");
    m.in_flight(3, 300);
    m.reconnect();
    m.producer_rebuild();
    m.status_update_sent();
    m.status_update_sent();
    m.slot_held(true);
    m.streaming(true);
    m.lag(1234, 5678, Some("extended"));
    m.safe_wal_size(Some(1 << 30));
    m.server_wal_lsn(Lsn(0x1000));

    let s = parse(&m.encode());
    let v = |name: &str| sample_value(&s, name, None);
    assert_eq!(v(names::RECEIVED_LSN), Some(768.0));
    assert_eq!(v(names::SENT_LSN), Some(640.0));
    assert_eq!(v(names::ACKNOWLEDGED_LSN), Some(592.0));
    assert_eq!(v(names::CONFIRMED_LSN), Some(512.0));
    assert_eq!(v(names::SERVER_WAL_LSN), Some(4096.0));
    assert_eq!(v(names::SLOT_LAG_BYTES), Some(1234.0));
    assert_eq!(v(names::SLOT_RETAINED_WAL_BYTES), Some(5678.0));
    assert_eq!(v(names::SLOT_SAFE_WAL_SIZE_BYTES), Some(1073741824.0));
    assert_eq!(v(names::IN_FLIGHT_RECORDS), Some(3.0));
    assert_eq!(v(names::IN_FLIGHT_BYTES), Some(300.0));
    assert_eq!(v(names::RECONNECTS_TOTAL), Some(1.0));
    assert_eq!(v(names::PRODUCER_REBUILDS_TOTAL), Some(1.0));
    assert_eq!(v(names::STATUS_UPDATES_TOTAL), Some(2.0));
    assert_eq!(v(names::SLOT_HELD), Some(1.0));
    assert_eq!(v(names::STREAMING), Some(1.0));
    assert_eq!(v(names::READY), Some(1.0));
    let topic = |name: &str, t: &str| sample_value(&s, name, Some(("topic", t)));
    assert_eq!(topic(names::PRODUCED_RECORDS_TOTAL, "orders"), Some(2.0));
    assert_eq!(topic(names::PRODUCED_BYTES_TOTAL, "orders"), Some(150.0));
    assert_eq!(topic(names::PRODUCED_RECORDS_TOTAL, "payments"), Some(1.0));
    assert_eq!(
        topic(names::DEAD_LETTERED_RECORDS_TOTAL, "payments"),
        Some(1.0)
    );
    assert_eq!(
        topic(names::DEAD_LETTERED_RECORDS_TOTAL, "orders"),
        Some(0.0)
    );
    assert_eq!(
        sample_value(
            &s,
            names::DELIVERY_ERRORS_TOTAL,
            Some(("class", "msg_timed_out"))
        ),
        Some(2.0)
    );
    for status in WAL_STATUSES {
        assert_eq!(
            sample_value(&s, names::SLOT_WAL_STATUS, Some(("status", status))),
            Some(if *status == "extended" { 1.0 } else { 0.0 }),
            "{status}"
        );
    }
    assert_eq!(
        sample_value(
            &s,
            names::BUILD_INFO,
            Some(("version", env!("CARGO_PKG_VERSION")))
        ),
        Some(1.0)
    );

    let hist = s
        .samples
        .iter()
        .find(|x| x.metric == names::END_TO_END_LATENCY_SECONDS)
        .expect("latency histogram parsed");
    let Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {hist:?}");
    };
    let count_le = |le: f64| buckets.iter().find(|b| b.less_than == le).map(|b| b.count);
    assert_eq!(count_le(0.0005), Some(0.0));
    assert_eq!(count_le(0.001), Some(1.0));
    assert_eq!(count_le(1.0), Some(1.0));
    assert_eq!(count_le(2.5), Some(2.0));
    assert_eq!(count_le(f64::INFINITY), Some(2.0));
    assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
}

#[test]
fn unknown_wal_status_is_reported_as_unknown() {
    let m = Metrics::new();
    let s = parse(&m.encode());
    assert_eq!(
        sample_value(&s, names::SLOT_WAL_STATUS, Some(("status", "unknown"))),
        Some(1.0),
        "before any sample"
    );
    assert_eq!(
        sample_value(&s, names::SLOT_SAFE_WAL_SIZE_BYTES, None),
        Some(-1.0)
    );
    m.lag(0, 0, Some("lost"));
    m.lag(0, 0, Some("something new"));
    let s = parse(&m.encode());
    assert_eq!(
        sample_value(&s, names::SLOT_WAL_STATUS, Some(("status", "unknown"))),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&s, names::SLOT_WAL_STATUS, Some(("status", "lost"))),
        Some(0.0)
    );
}

#[test]
fn topic_labels_are_bounded() {
    let m = Metrics::with_options(MetricsOptions {
        max_topic_labels: 3,
        ..MetricsOptions::default()
    });
    for i in 0..10 {
        m.record_produced(&format!("topic{i}"), 10);
    }
    // A topic seen before the bound filled keeps its own label.
    m.record_produced("topic1", 10);
    m.dead_lettered("topic9");
    let s = parse(&m.encode());
    let values: BTreeSet<String> = s
        .samples
        .iter()
        .filter(|x| x.metric == names::PRODUCED_RECORDS_TOTAL)
        .map(|x| x.labels.get("topic").unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = ["topic0", "topic1", "topic2", OTHER_LABEL]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(values, expected);
    let records = |t: &str| sample_value(&s, names::PRODUCED_RECORDS_TOTAL, Some(("topic", t)));
    assert_eq!(records("topic1"), Some(2.0));
    assert_eq!(records(OTHER_LABEL), Some(7.0));
    assert_eq!(
        sample_value(
            &s,
            names::PRODUCED_BYTES_TOTAL,
            Some(("topic", OTHER_LABEL))
        ),
        Some(70.0)
    );
    assert_eq!(
        sample_value(
            &s,
            names::DEAD_LETTERED_RECORDS_TOTAL,
            Some(("topic", OTHER_LABEL))
        ),
        Some(1.0)
    );
}

#[test]
fn error_classes_are_bounded() {
    let m = Metrics::with_options(MetricsOptions {
        max_error_class_labels: 2,
        ..MetricsOptions::default()
    });
    for class in ["a", "b", "c", "d", "a"] {
        m.delivery_error(class);
    }
    let s = parse(&m.encode());
    let class = |c: &str| sample_value(&s, names::DELIVERY_ERRORS_TOTAL, Some(("class", c)));
    assert_eq!(class("a"), Some(2.0));
    assert_eq!(class("b"), Some(1.0));
    assert_eq!(class("c"), None);
    assert_eq!(class(OTHER_LABEL), Some(2.0));
}

#[test]
fn bounded_labels_lookup_reuses_handles() {
    let mut b: BoundedLabels<u32> = BoundedLabels::new(2);
    let mut made = 0;
    for v in ["x", "y", "x", "z", "w", "y"] {
        b.with(
            v,
            |_| {
                made += 1;
                made
            },
            |_| (),
        );
    }
    // x, y, then one shared overflow handle.
    assert_eq!(made, 3);
    assert_eq!(b.by_value.len(), 2);
}

#[test]
fn readiness_follows_the_streaming_flag() {
    let m = Metrics::new();
    assert!(m.readiness().unwrap_err().contains("not started"));
    m.streaming(true);
    assert_eq!(m.readiness(), Ok(()));
    let s = parse(&m.encode());
    assert_eq!(sample_value(&s, names::READY, None), Some(1.0));
    m.streaming(false);
    assert!(m.readiness().unwrap_err().contains("down"));
    let s = parse(&m.encode());
    assert_eq!(sample_value(&s, names::READY, None), Some(0.0));
}

#[test]
fn time_lag_rules() {
    let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let s = Duration::from_secs;
    // Caught up: zero, whatever the timestamps say.
    assert_eq!(time_lag(t0, true, Some(t0 - s(3600)), None), Duration::ZERO);
    // Nothing known yet.
    assert_eq!(time_lag(t0, false, None, None), Duration::ZERO);
    // Behind: now minus the newest confirmed commit.
    assert_eq!(time_lag(t0, false, Some(t0 - s(5)), None), s(5));
    // After an idle hour, a new record in flight is not an hour behind: the
    // last caught-up moment bounds it.
    assert_eq!(
        time_lag(t0, false, Some(t0 - s(3600)), Some(t0 - s(2))),
        s(2)
    );
    assert_eq!(time_lag(t0, false, Some(t0 - s(1)), Some(t0 - s(9))), s(1));
    // Clock skew (commit in the future): zero, not a panic.
    assert_eq!(time_lag(t0, false, Some(t0 + s(1)), None), Duration::ZERO);
}

#[test]
fn lag_seconds_is_zero_when_caught_up_and_grows_when_behind() {
    let m = Metrics::new();
    m.streaming(true);
    let old = crate::lsn::system_time_to_pg_micros(SystemTime::now() - Duration::from_secs(100));
    m.confirmed_commit_time(old);
    let s = parse(&m.encode());
    assert_eq!(sample_value(&s, names::LAG_SECONDS, None), Some(0.0));
    // In flight: behind by at most the time since the last caught-up moment.
    m.in_flight(1, 10);
    let lag = m.snapshot().lag_seconds;
    assert!(lag < 5.0, "{lag}");
    let ts = sample_value(&s, names::CONFIRMED_COMMIT_TIMESTAMP_SECONDS, None).unwrap();
    let expect = unix_seconds(pg_micros_to_system_time(old));
    assert!((ts - expect).abs() < 1e-3, "{ts} vs {expect}");
    // Older commit times never move it back.
    m.confirmed_commit_time(old - 1_000_000);
    let s = parse(&m.encode());
    let ts2 = sample_value(&s, names::CONFIRMED_COMMIT_TIMESTAMP_SECONDS, None).unwrap();
    assert_eq!(ts, ts2);
}

#[test]
fn latency_since_commit_uses_the_pg_epoch() {
    let now = SystemTime::now();
    let commit = crate::lsn::system_time_to_pg_micros(now - Duration::from_millis(250));
    let l = latency_since_commit(commit, now);
    assert!(
        (l.as_secs_f64() - 0.25).abs() < 0.001,
        "{l:?} should be about 250 ms"
    );
    assert_eq!(
        latency_since_commit(commit, now - Duration::from_secs(1)),
        Duration::ZERO
    );
}

#[test]
fn progress_rate_and_snapshot() {
    let m = Metrics::new();
    m.streaming(true);
    m.confirmed_lsn(Lsn(0x10));
    m.lag(42, 100, Some("reserved"));
    let mut p = ProgressLog::new();
    let t0 = Instant::now();
    let s0 = m.snapshot();
    assert_eq!(s0.lag_bytes, Some(42));
    assert_eq!(s0.confirmed_lsn, Lsn(0x10));
    assert_eq!(p.rate(&s0, t0), 0.0);
    for _ in 0..50 {
        m.record_acked(Duration::from_millis(1));
    }
    let s1 = m.snapshot();
    assert_eq!(s1.acked_records, 50);
    assert_eq!(p.rate(&s1, t0 + Duration::from_secs(10)), 5.0);
    // The log line itself must not panic without a subscriber.
    p.log(&m);
}

#[test]
fn hot_path_handles_are_shared_with_the_registry() {
    // A cached handle increments the very series the registry encodes.
    let m = Metrics::new();
    for _ in 0..1000 {
        m.record_produced("hot", 1);
    }
    let s = parse(&m.encode());
    assert_eq!(
        sample_value(&s, names::PRODUCED_RECORDS_TOTAL, Some(("topic", "hot"))),
        Some(1000.0)
    );
}

// --- deploy/ files -------------------------------------------------------

/// Every `outbox_relay_*` identifier in `text`.
fn metric_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("outbox_relay_") {
        let start = i + pos;
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded_by_ident {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The metric a referenced series belongs to (histogram series map to the
/// histogram's name); `None` if it is not ours.
fn known_metric(series: &str) -> Option<&'static str> {
    if let Some(n) = names::ALL.iter().find(|n| **n == series) {
        return Some(n);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if let Some(h) = names::HISTOGRAMS.iter().find(|h| **h == base) {
                return Some(h);
            }
        }
    }
    None
}

fn collect_json_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_json_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_json_exprs(i, out)),
        _ => {}
    }
}

fn deploy_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn grafana_dashboard_uses_only_known_metrics() {
    let text = deploy_file("deploy/grafana/outbox-relay.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(dashboard["title"].is_string(), "dashboard has a title");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    let mut exprs = Vec::new();
    collect_json_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for r in metric_refs(&text) {
        let m = known_metric(&r).unwrap_or_else(|| panic!("dashboard uses unknown metric {r}"));
        used.insert(m);
    }
    for expr in &exprs {
        assert!(
            !metric_refs(expr).is_empty() || expr.contains("up{"),
            "query uses none of our metrics: {expr}"
        );
    }
    // The dashboard shows the metrics an operator needs most.
    for needed in [
        names::SLOT_LAG_BYTES,
        names::SLOT_RETAINED_WAL_BYTES,
        names::LAG_SECONDS,
        names::END_TO_END_LATENCY_SECONDS,
        names::PRODUCED_RECORDS_TOTAL,
        names::READY,
    ] {
        assert!(used.contains(needed), "dashboard lacks {needed}");
    }
}

#[test]
fn alert_rules_use_only_known_metrics() {
    let text = deploy_file("deploy/prometheus/alerts.yml");
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("alerts.yml is YAML");
    let groups = doc["groups"].as_sequence().expect("a `groups` list");
    let mut alerts = Vec::new();
    for g in groups {
        assert!(g["name"].as_str().is_some(), "group without a name");
        for rule in g["rules"].as_sequence().expect("a `rules` list") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name} has no severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name} has no summary"
            );
            for r in metric_refs(expr) {
                assert!(known_metric(&r).is_some(), "{name} uses unknown metric {r}");
            }
            alerts.push((name.to_string(), expr.to_string()));
        }
    }
    // Every `outbox_relay_*` anywhere in the file (comments included) exists.
    for r in metric_refs(&text) {
        assert!(
            known_metric(&r).is_some(),
            "alerts.yml names unknown metric {r}"
        );
    }
    let uses = |metric: &str| alerts.iter().any(|(_, e)| e.contains(metric));
    assert!(uses(names::SLOT_RETAINED_WAL_BYTES));
    assert!(uses(names::LAG_SECONDS));
    assert!(uses(names::READY));
    assert!(
        alerts.iter().any(|(_, e)| e.contains("up{")),
        "a relay-down rule on `up`"
    );
}

#[test]
fn metric_refs_finds_identifiers() {
    let refs = metric_refs(
        "rate(outbox_relay_produced_records_total{topic=\"a\"}[5m]) / x_outbox_relay_nope + outbox_relay_ready",
    );
    let want: BTreeSet<String> = ["outbox_relay_produced_records_total", "outbox_relay_ready"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
}
