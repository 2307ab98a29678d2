//! Kubernetes service links: the variables the kubelet puts into every pod for
//! every Service of the namespace (unless the pod sets `enableServiceLinks:
//! false`). A Service named `outbox-relay` (or `outbox-relay-<anything>`) gives
//! names that start with our prefix, and the strict check of `OUTBOX_RELAY_*`
//! variables would reject them and crash-loop the pod.
//!
//! For a Service whose name upper-cased (with `-` as `_`) is `S`, the kubelet
//! sets (see Kubernetes' `pkg/kubelet/envvars`):
//!
//! | variable | value |
//! |---|---|
//! | `S_SERVICE_HOST` | the cluster IP |
//! | `S_SERVICE_PORT` | the first port |
//! | `S_SERVICE_PORT_<PORTNAME>` | each named port |
//! | `S_PORT` | `tcp://<ip>:<port>` of the first port |
//! | `S_PORT_<port>_<PROTO>` | `<proto>://<ip>:<port>` |
//! | `S_PORT_<port>_<PROTO>_PROTO` | `tcp`, `udp` or `sctp` |
//! | `S_PORT_<port>_<PROTO>_PORT` | the port |
//! | `S_PORT_<port>_<PROTO>_ADDR` | the cluster IP |
//!
//! They always come together, so a name is ignored only when it has one of
//! these shapes, its value has the matching form, **and** `S_SERVICE_HOST`
//! holding an IP address is set too. Anything else under the prefix (a typo
//! such as `OUTBOX_RELAY_POSTGRES_PORT=5432` included) is still rejected.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Whether `name=value` is a Kubernetes service-link variable (see the module
/// documentation); `env` holds the other `OUTBOX_RELAY_*` variables.
pub fn is_service_link(name: &str, value: &str, env: &BTreeMap<String, String>) -> bool {
    let has_host = |service: &str| {
        !service.is_empty()
            && env
                .get(&format!("{service}_SERVICE_HOST"))
                .is_some_and(|v| v.parse::<IpAddr>().is_ok())
    };
    if let Some(service) = name.strip_suffix("_SERVICE_HOST") {
        return !service.is_empty() && value.parse::<IpAddr>().is_ok();
    }
    // S_SERVICE_PORT and S_SERVICE_PORT_<PORTNAME>
    if let Some(at) = name.find("_SERVICE_PORT") {
        let (service, rest) = (&name[..at], &name[at + "_SERVICE_PORT".len()..]);
        let port_name_ok = rest.is_empty()
            || rest.strip_prefix('_').is_some_and(|n| {
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            });
        return port_name_ok && value.parse::<u16>().is_ok() && has_host(service);
    }
    // S_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]: the longest match wins, so
    // look for `_PORT_<digits>_<PROTO>` from the right.
    for (at, _) in name.rmatch_indices("_PORT_") {
        let service = &name[..at];
        let mut parts = name[at + "_PORT_".len()..].splitn(3, '_');
        let (Some(port), Some(proto)) = (parts.next(), parts.next()) else {
            continue;
        };
        if port.parse::<u16>().is_err() || !["TCP", "UDP", "SCTP"].contains(&proto) {
            continue;
        }
        let lower = proto.to_ascii_lowercase();
        let value_ok = match parts.next() {
            None => is_link_url(value, Some(&lower), Some(port)),
            Some("PROTO") => value == lower,
            Some("PORT") => value == port,
            Some("ADDR") => value.parse::<IpAddr>().is_ok(),
            Some(_) => false,
        };
        return value_ok && has_host(service);
    }
    // S_PORT
    if let Some(service) = name.strip_suffix("_PORT") {
        return is_link_url(value, None, None) && has_host(service);
    }
    false
}

/// `<proto>://<ip>:<port>` (IPv6 in brackets), optionally with a given proto and port.
fn is_link_url(value: &str, proto: Option<&str>, port: Option<&str>) -> bool {
    let Some((scheme, addr)) = value.split_once("://") else {
        return false;
    };
    let Some((host, p)) = addr.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ["tcp", "udp", "sctp"].contains(&scheme)
        && proto.map_or(true, |want| want == scheme)
        && port.map_or(true, |want| want == p)
        && p.parse::<u16>().is_ok()
        && host.parse::<IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kubelet injects for a Service `outbox-relay` with port 9187
    /// named `http`, and for a Service `outbox-relay-metrics` on 9090/UDP.
    fn kubelet_env() -> BTreeMap<String, String> {
        [
            ("OUTBOX_RELAY_SERVICE_HOST", "10.96.12.34"),
            ("OUTBOX_RELAY_SERVICE_PORT", "9187"),
            ("OUTBOX_RELAY_SERVICE_PORT_HTTP", "9187"),
            ("OUTBOX_RELAY_PORT", "tcp://10.96.12.34:9187"),
            ("OUTBOX_RELAY_PORT_9187_TCP", "tcp://10.96.12.34:9187"),
            ("OUTBOX_RELAY_PORT_9187_TCP_PROTO", "tcp"),
            ("OUTBOX_RELAY_PORT_9187_TCP_PORT", "9187"),
            ("OUTBOX_RELAY_PORT_9187_TCP_ADDR", "10.96.12.34"),
            ("OUTBOX_RELAY_METRICS_SERVICE_HOST", "fd00::1"),
            ("OUTBOX_RELAY_METRICS_SERVICE_PORT", "9090"),
            ("OUTBOX_RELAY_METRICS_PORT", "udp://[fd00::1]:9090"),
            ("OUTBOX_RELAY_METRICS_PORT_9090_UDP", "udp://[fd00::1]:9090"),
            ("OUTBOX_RELAY_METRICS_PORT_9090_UDP_ADDR", "fd00::1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn every_kubelet_variable_is_a_service_link() {
        let env = kubelet_env();
        for (k, v) in &env {
            assert!(is_service_link(k, v, &env), "{k}={v}");
        }
    }

    #[test]
    fn look_alikes_are_not() {
        let env = kubelet_env();
        for (k, v) in [
            // No matching *_SERVICE_HOST: a typo or a guess at a setting.
            ("OUTBOX_RELAY_POSTGRES_PORT", "5432"),
            ("OUTBOX_RELAY_POSTGRES_PORT", "tcp://10.0.0.1:5432"),
            ("OUTBOX_RELAY_KAFKA_SERVICE_PORT", "9092"),
            ("OUTBOX_RELAY_DB_PORT_5432_TCP_PORT", "5432"),
            // Shapes right, values wrong.
            ("OUTBOX_RELAY_SERVICE_HOST", "db.example"),
            ("OUTBOX_RELAY_SERVICE_PORT", "http"),
            ("OUTBOX_RELAY_PORT", "9187"),
            ("OUTBOX_RELAY_PORT_9187_TCP_PROTO", "udp"),
            ("OUTBOX_RELAY_PORT_9187_TCP_PORT", "9188"),
            ("OUTBOX_RELAY_PORT_9187_TCP", "udp://10.96.12.34:9187"),
            ("OUTBOX_RELAY_PORT_9187_HTTP", "tcp://10.96.12.34:9187"),
            ("OUTBOX_RELAY_PORT_9187_TCP_HOST", "10.96.12.34"),
            ("OUTBOX_RELAY_SERVICE_PORT_http", "9187"),
            // Ordinary settings and their typos.
            ("OUTBOX_RELAY_SLOT", "s"),
            ("OUTBOX_RELAY_KAFKA_BROKER", "k:9092"),
            ("OUTBOX_RELAY_HTTP_PORT", "9187"),
        ] {
            assert!(!is_service_link(k, v, &env), "{k}={v}");
        }
        // Without the host variable even the kubelet's own shapes are rejected.
        let alone = BTreeMap::new();
        assert!(!is_service_link(
            "OUTBOX_RELAY_SERVICE_PORT",
            "9187",
            &alone
        ));
        assert!(!is_service_link(
            "OUTBOX_RELAY_PORT",
            "tcp://10.96.12.34:9187",
            &alone
        ));
    }
}
