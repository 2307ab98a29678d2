//! Reading a relay's `/metrics` (and other HTTP endpoints) in tests.
#![allow(dead_code)]

use prometheus_parse::{Scrape, Value};

use super::outbox::DEADLINE;
use super::{wait_for, RelayProcess};

/// The relay's HTTP address, from its log line.
pub async fn http_addr(relay: &mut RelayProcess) -> String {
    wait_for(DEADLINE, "the relay logs its HTTP address", || {
        let log = relay.log();
        async move {
            let line = log.lines().find(|l| l.contains("serving /metrics"))?;
            let at = line.find("addr=")? + "addr=".len();
            Some(line[at..].split_whitespace().next()?.to_string())
        }
    })
    .await
}

/// `GET path` over HTTP/1.1: status code and body.
pub async fn get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the relay's HTTP listener");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

pub fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("/metrics parses")
}

/// Value of a sample, summed over the samples whose labels include `label`
/// (all of them when `None`); histogram series count as 0 (read their
/// `_count` and `_sum`, or use [`above`]).
pub fn sample(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    parse(text)
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| label.map_or(true, |(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Whether a series of `name` with `label` is exported at all.
pub fn has_series(text: &str, name: &str, label: (&str, &str)) -> bool {
    parse(text)
        .samples
        .iter()
        .any(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
}

/// Observations of histogram `name` (the series with `label`) above `bound`
/// seconds: its `_count` minus its bucket `le = bound` (a bucket bound of the
/// histogram).
pub fn above(text: &str, name: &str, label: (&str, &str), bound: f64) -> f64 {
    let count = sample(text, &format!("{name}_count"), Some(label));
    let within: f64 = parse(text)
        .samples
        .iter()
        .filter(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
        .filter_map(|s| match &s.value {
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| (b.less_than - bound).abs() < 1e-12)
                .map(|b| b.count),
            _ => None,
        })
        .sum();
    count - within
}
