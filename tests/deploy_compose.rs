//! The deployment files, checked without Docker or systemd: `docker-compose.yml`,
//! the `Dockerfile`, the Prometheus and Grafana provisioning, the systemd unit and
//! docs/deploy.md. They parse; every file they reference exists; ports, service
//! names and `OUTBOX_RELAY_*` variables agree with each other and with the relay's
//! own configuration (`cli::known_env_vars`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_norway::Value;

/// The relay's HTTP port in the container (metrics, /healthz, /readyz).
const RELAY_HTTP_PORT: u16 = 9187;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// `environment:` as a map or a `KEY=VALUE` list.
fn environment(service: &Value) -> Vec<(String, String)> {
    match service.get("environment") {
        None => vec![],
        Some(Value::Mapping(m)) => m.iter().map(|(k, v)| (str_of(k), str_of(v))).collect(),
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|e| {
                let e = str_of(e);
                let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Some(other) => panic!("environment: {other:?}"),
    }
}

fn env_value(service: &Value, key: &str) -> String {
    environment(service)
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in environment"))
        .1
}

/// Short-syntax volumes `SRC:DST[:MODE]` whose source is a path (not a named volume).
fn bind_mounts(service: &Value) -> Vec<(String, String)> {
    service
        .get("volumes")
        .and_then(Value::as_sequence)
        .map(|s| s.iter().map(str_of).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.starts_with("./") || v.starts_with('/'))
        .map(|v| {
            let mut parts = v.splitn(3, ':');
            (
                parts.next().unwrap().to_string(),
                parts.next().expect("SRC:DST").to_string(),
            )
        })
        .collect()
}

fn depends_on(service: &Value) -> Vec<(String, String)> {
    match service.get("depends_on") {
        None => vec![],
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                let condition = v
                    .get("condition")
                    .map(str_of)
                    .unwrap_or_else(|| "service_started".into());
                (str_of(k), condition)
            })
            .collect(),
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|k| (str_of(k), "service_started".into()))
            .collect(),
        Some(other) => panic!("depends_on: {other:?}"),
    }
}

/// Container ports published: (host part, container port).
fn published_ports(service: &Value) -> Vec<(String, u16)> {
    service
        .get("ports")
        .and_then(Value::as_sequence)
        .map(|s| s.iter().map(str_of).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let (host, container) = p.rsplit_once(':').expect("HOST:CONTAINER");
            (host.to_string(), container.parse().expect("a port number"))
        })
        .collect()
}

fn known_env() -> BTreeSet<String> {
    outbox_relay::cli::known_env_vars().into_iter().collect()
}

/// Every `OUTBOX_RELAY_*` word in `text`.
fn env_names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("OUTBOX_RELAY_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = name.trim_end_matches('_');
        if name.len() > "OUTBOX_RELAY".len() {
            out.insert(name.to_string());
        }
        rest = &rest[i + "OUTBOX_RELAY_".len()..];
    }
    out
}

fn assert_exists(from: &str, rel: &str) {
    let path = root().join(rel.trim_start_matches("./"));
    assert!(
        path.exists(),
        "{from} references {rel}, which does not exist"
    );
}

#[test]
fn compose_parses_and_has_the_services() {
    let c = compose();
    for name in ["postgres", "kafka", "relay", "prometheus", "grafana"] {
        service(&c, name);
    }
    let image = |s: &str| str_of(&service(&c, s)["image"]);
    assert!(
        image("postgres").starts_with("postgres:17"),
        "{}",
        image("postgres")
    );
    assert!(
        image("kafka").starts_with("apache/kafka:"),
        "{}",
        image("kafka")
    );
    // Monitoring only with its profile; the core without one.
    for name in ["prometheus", "grafana"] {
        let profiles: Vec<String> = service(&c, name)["profiles"]
            .as_sequence()
            .expect("profiles")
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(profiles, ["monitoring"], "{name}");
    }
    for name in ["postgres", "kafka", "relay"] {
        assert!(service(&c, name).get("profiles").is_none(), "{name}");
    }
}

#[test]
fn postgres_is_logical_and_runs_every_sql_file() {
    let c = compose();
    let pg = service(&c, "postgres");
    let command: Vec<String> = pg["command"]
        .as_sequence()
        .expect("command as a list")
        .iter()
        .map(str_of)
        .collect();
    assert!(
        command.iter().any(|a| a == "wal_level=logical"),
        "{command:?}"
    );
    assert!(
        command
            .iter()
            .any(|a| a.starts_with("max_slot_wal_keep_size=")),
        "cap the WAL a stalled slot keeps: {command:?}"
    );
    let mounts = bind_mounts(pg);
    let mut sql_files: Vec<String> = std::fs::read_dir(root().join("sql"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    sql_files.sort();
    assert!(!sql_files.is_empty());
    for file in &sql_files {
        let mounted = mounts
            .iter()
            .find(|(src, _)| src == &format!("./sql/{file}"));
        let (_, dst) = mounted.unwrap_or_else(|| panic!("sql/{file} is not an init script"));
        assert!(dst.starts_with("/docker-entrypoint-initdb.d/"), "{dst}");
    }
    // Init scripts run in name order: the files keep theirs.
    let initdb: Vec<&String> = mounts
        .iter()
        .filter(|(_, d)| d.starts_with("/docker-entrypoint-initdb.d/"))
        .map(|(_, d)| d)
        .collect();
    let mut sorted = initdb.clone();
    sorted.sort();
    assert_eq!(initdb, sorted);
    assert!(
        pg.get("healthcheck").is_some(),
        "postgres needs a healthcheck"
    );
}

#[test]
fn every_referenced_file_exists() {
    let c = compose();
    for (name, svc) in c["services"].as_mapping().unwrap() {
        let name = str_of(name);
        for (src, _) in bind_mounts(svc) {
            assert_exists(&format!("service {name}"), &src);
        }
        if let Some(build) = svc.get("build") {
            let context = build.get("context").map(str_of).unwrap_or(".".into());
            let dockerfile = build
                .get("dockerfile")
                .map(str_of)
                .unwrap_or("Dockerfile".into());
            assert_exists(&format!("service {name}"), &context);
            assert_exists(
                &format!("service {name}"),
                &Path::new(&context).join(dockerfile).display().to_string(),
            );
        }
        for secret in svc
            .get("secrets")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let secret = str_of(secret);
            assert!(
                c["secrets"].get(secret.as_str()).is_some(),
                "service {name} uses undeclared secret {secret}"
            );
        }
    }
    for (name, secret) in c["secrets"].as_mapping().unwrap() {
        if let Some(file) = secret.get("file") {
            assert_exists(&format!("secret {}", str_of(name)), &str_of(file));
        }
    }
}

#[test]
fn relay_settings_match_the_relay_and_the_other_services() {
    let c = compose();
    let relay = service(&c, "relay");
    let known = known_env();
    for (key, _) in environment(relay) {
        if key.starts_with("OUTBOX_RELAY_") {
            assert!(known.contains(&key), "relay: {key} is not a relay setting");
        }
    }
    // PostgreSQL: the compose service, its port and database, the role of sql/03.
    let url = url::Url::parse(&env_value(relay, "OUTBOX_RELAY_POSTGRES_URL")).unwrap();
    assert_eq!(url.host_str(), Some("postgres"));
    assert_eq!(url.port(), Some(5432));
    assert_eq!(
        url.path(),
        format!("/{}", env_value(service(&c, "postgres"), "POSTGRES_DB"))
    );
    assert_eq!(url.username(), "outbox_relay");
    assert!(read("sql/03_relay_role.sql").contains("CREATE ROLE outbox_relay"));
    assert!(
        url.password().is_none(),
        "the password comes from a secret file"
    );
    // Parsed by the relay's own loader.
    let cfg = outbox_relay::config::PostgresConfig {
        url: url.to_string(),
        ..Default::default()
    };
    cfg.replication_connect_config()
        .unwrap_or_else(|e| panic!("the relay rejects its URL: {e}"));
    // The password file is the secret the relay is given.
    let pw_file = env_value(relay, "OUTBOX_RELAY_POSTGRES_PASSWORD_FILE");
    let secret = pw_file
        .strip_prefix("/run/secrets/")
        .expect("a secret file");
    let relay_secrets: Vec<String> = relay["secrets"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert!(
        relay_secrets.iter().any(|s| s == secret),
        "{relay_secrets:?}"
    );
    // Kafka: the compose service and a listener it advertises under that name.
    let brokers = env_value(relay, "OUTBOX_RELAY_KAFKA_BROKERS");
    let kafka = service(&c, "kafka");
    let advertised = env_value(kafka, "KAFKA_ADVERTISED_LISTENERS");
    for broker in brokers.split(',') {
        assert!(
            advertised
                .split(',')
                .any(|l| l.ends_with(&format!("//{broker}"))),
            "{broker} is not among kafka's advertised listeners {advertised}"
        );
    }
    // HTTP: listening on the port that is published, scraped and health-checked.
    let listen = env_value(relay, "OUTBOX_RELAY_HTTP_LISTEN");
    assert_eq!(listen, format!("0.0.0.0:{RELAY_HTTP_PORT}"));
    let ports = published_ports(relay);
    assert!(
        ports.iter().any(|(_, p)| *p == RELAY_HTTP_PORT),
        "{ports:?}"
    );
    for svc in c["services"].as_mapping().unwrap().values() {
        for (host, _) in published_ports(svc) {
            assert!(
                host.starts_with("127.0.0.1:"),
                "publish on loopback only: {host}"
            );
        }
    }
    // Hardening of the relay container.
    assert_eq!(relay["read_only"], Value::Bool(true));
    assert!(relay["cap_drop"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|c| str_of(c) == "ALL"));
}

#[test]
fn services_come_up_in_order() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    let dockerfile_healthcheck = read("Dockerfile").contains("\nHEALTHCHECK ");
    let has_healthcheck = |name: &str| {
        let svc = service(&c, name);
        svc.get("healthcheck").is_some() || (svc.get("build").is_some() && dockerfile_healthcheck)
    };
    for (name, svc) in services {
        for (dep, condition) in depends_on(svc) {
            assert!(
                services.contains_key(dep.as_str()),
                "{name:?} depends on unknown {dep}"
            );
            if condition == "service_healthy" {
                assert!(
                    has_healthcheck(&dep),
                    "{name:?} waits for {dep} to be healthy, which has no healthcheck"
                );
            }
        }
    }
    let deps = |name: &str| depends_on(service(&c, name));
    let healthy = |d: &[(String, String)], on: &str| {
        d.iter().any(|(n, cnd)| n == on && cnd == "service_healthy")
    };
    assert!(healthy(&deps("relay"), "postgres") && healthy(&deps("relay"), "kafka"));
    assert!(healthy(&deps("prometheus"), "relay"));
    assert!(healthy(&deps("grafana"), "prometheus"));
}

#[test]
fn prometheus_scrapes_the_relay_with_the_alert_rules() {
    let c = compose();
    let prometheus = service(&c, "prometheus");
    let mounts = bind_mounts(prometheus);
    let mounted_at = |src: &str| {
        mounts
            .iter()
            .find(|(s, _)| s == src)
            .unwrap_or_else(|| panic!("{src} is not mounted into prometheus"))
            .1
            .clone()
    };
    let config_path = mounted_at("./deploy/prometheus/prometheus.yml");
    let config = yaml("deploy/prometheus/prometheus.yml");
    let command: Vec<String> = prometheus["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert!(
        command.contains(&format!("--config.file={config_path}")),
        "{command:?}"
    );
    let rules: Vec<String> = config["rule_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(rules, [mounted_at("./deploy/prometheus/alerts.yml")]);
    let alerts = yaml("deploy/prometheus/alerts.yml");
    assert!(!alerts["groups"].as_sequence().unwrap().is_empty());
    let jobs = config["scrape_configs"].as_sequence().unwrap();
    let job = jobs
        .iter()
        .find(|j| str_of(&j["job_name"]) == "outbox-relay")
        .expect("a scrape job named outbox-relay (the alert rules match on it)");
    assert!(read("deploy/prometheus/alerts.yml").contains("job=\"outbox-relay\""));
    let targets: Vec<String> = job["static_configs"][0]["targets"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(targets, [format!("relay:{RELAY_HTTP_PORT}")]);
}

#[test]
fn grafana_provisions_the_datasource_and_the_dashboard() {
    let c = compose();
    let grafana = service(&c, "grafana");
    let mounts = bind_mounts(grafana);
    let dst = |src: &str| {
        mounts
            .iter()
            .find(|(s, _)| s == src)
            .unwrap_or_else(|| panic!("{src} is not mounted into grafana"))
            .1
            .clone()
    };
    let ds_dst = dst("./deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(ds_dst.starts_with("/etc/grafana/provisioning/datasources/"));
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let source = &ds["datasources"][0];
    assert_eq!(str_of(&source["type"]), "prometheus");
    let prometheus_port = published_ports(service(&c, "prometheus"))[0].1;
    assert_eq!(
        str_of(&source["url"]),
        format!("http://prometheus:{prometheus_port}")
    );

    let provider_dst = dst("./deploy/grafana/provisioning/dashboards/outbox-relay.yml");
    assert!(provider_dst.starts_with("/etc/grafana/provisioning/dashboards/"));
    let provider = yaml("deploy/grafana/provisioning/dashboards/outbox-relay.yml");
    let folder = str_of(&provider["providers"][0]["options"]["path"]);
    let dashboard_dst = dst("./deploy/grafana/outbox-relay.json");
    assert_eq!(Path::new(&dashboard_dst).parent(), Some(Path::new(&folder)));
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/outbox-relay.json")).unwrap();
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    assert_eq!(
        env_value(grafana, "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"),
        dashboard_dst
    );
}

#[test]
fn dockerfile_paths_user_port_and_healthcheck() {
    let text = read("Dockerfile");
    // Join continuation lines into instructions.
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(t.trim_end_matches('\\'));
        current.push(' ');
        if !t.ends_with('\\') {
            instructions.push(current.trim().to_string());
            current.clear();
        }
    }
    let of = |kw: &str| -> Vec<&String> {
        instructions
            .iter()
            .filter(|i| i.split_whitespace().next() == Some(kw))
            .collect()
    };
    // Sources copied from the build context exist.
    let ignored = read(".dockerignore");
    for copy in of("COPY") {
        let words: Vec<&str> = copy.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let args: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        for src in &args[..args.len() - 1] {
            assert_exists("Dockerfile", src);
            assert!(
                !ignored.lines().any(|l| l.trim() == *src),
                "{src} is copied but .dockerignore excludes it"
            );
        }
    }
    // The binary it builds is this package's binary, and is the entrypoint.
    let build = instructions
        .iter()
        .find(|i| i.contains("cargo build"))
        .expect("a cargo build step");
    assert!(
        build.contains("--bin outbox-relay") && build.contains("--locked"),
        "{build}"
    );
    assert!(root().join("src/main.rs").exists());
    let entrypoint = of("ENTRYPOINT");
    assert_eq!(entrypoint.len(), 1);
    let copied_to = of("COPY")
        .into_iter()
        .find(|c| c.contains("--from=build"))
        .and_then(|c| c.split_whitespace().last())
        .expect("the binary copied from the build stage")
        .to_string();
    assert!(
        entrypoint[0].contains(&format!("\"{copied_to}\"")),
        "{}",
        entrypoint[0]
    );
    // Non-root.
    let user = of("USER");
    let user = user.last().expect("a USER instruction");
    let name = user.split_whitespace().nth(1).unwrap();
    assert!(
        !name.starts_with("root") && !name.starts_with("0:") && name != "0",
        "{user}"
    );
    // The HTTP listener: a known variable, the exposed port, the healthchecked port.
    let env_line = of("ENV")
        .into_iter()
        .find(|e| e.contains("OUTBOX_RELAY_HTTP_LISTEN"))
        .expect("ENV OUTBOX_RELAY_HTTP_LISTEN");
    assert!(
        env_line.contains(&format!("=0.0.0.0:{RELAY_HTTP_PORT}")),
        "{env_line}"
    );
    for name in env_names_in(&text) {
        assert!(
            known_env().contains(&name),
            "Dockerfile: {name} is not a relay setting"
        );
    }
    assert!(of("EXPOSE")[0].contains(&RELAY_HTTP_PORT.to_string()));
    let health = of("HEALTHCHECK");
    assert_eq!(health.len(), 1);
    let script = of("COPY")
        .into_iter()
        .find(|c| c.contains("healthcheck.sh"))
        .expect("the healthcheck script is copied into the image")
        .to_string();
    let installed = script.split_whitespace().last().unwrap();
    assert!(
        health[0].contains(&format!("\"{installed}\"")),
        "{}",
        health[0]
    );
    let body = read("deploy/docker/healthcheck.sh");
    assert!(
        body.contains("/healthz") && body.contains(&format!("127.0.0.1:{RELAY_HTTP_PORT}")),
        "{body}"
    );
    // /healthz is a route of the relay's HTTP server.
    assert!(read("src/http.rs").contains("\"/healthz\""));
}

#[test]
fn systemd_unit_is_hardened_and_uses_real_settings() {
    let text = read("deploy/systemd/outbox-relay.service");
    let mut section = String::new();
    let mut entries: Vec<(String, String, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        entries.push((section.clone(), k.to_string(), v.to_string()));
    }
    let get = |sec: &str, key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == sec && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("DynamicUser", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(get("Service", key), [want], "{key}");
    }
    let exec = get("Service", "ExecStart");
    assert_eq!(exec.len(), 1);
    let mut words = exec[0].split_whitespace();
    assert!(words.next().unwrap().ends_with("/outbox-relay"));
    assert_eq!(words.next(), Some("run"));
    // Secrets arrive as files (credentials), never as values in the unit.
    for (_, key, value) in &entries {
        if key == "Environment" {
            let (name, _) = value.split_once('=').unwrap();
            assert!(known_env().contains(name), "{name} is not a relay setting");
            assert!(
                !name.ends_with("_PASSWORD"),
                "{name}: use the _FILE variant"
            );
        }
    }
    for name in env_names_in(&text) {
        assert!(
            known_env().contains(&name),
            "systemd unit: {name} is not a relay setting"
        );
    }
    assert_eq!(get("Install", "WantedBy"), ["multi-user.target"]);
    // Time to drain on SIGTERM beyond the relay's default shutdown timeout (30s).
    let stop: u64 = get("Service", "TimeoutStopSec")[0]
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(stop > outbox_relay::config::DEFAULT_SHUTDOWN_TIMEOUT.as_secs());
}

#[test]
fn deploy_guide_names_real_settings() {
    let guide = read("docs/deploy.md");
    let known = known_env();
    // Kubernetes service-link variables, named as examples of what is ignored.
    let service_link = |name: &str| {
        name.ends_with("_SERVICE_HOST")
            || name.starts_with("OUTBOX_RELAY_PORT")
            || name.starts_with("OUTBOX_RELAY_SERVICE_PORT")
    };
    for name in env_names_in(&guide)
        .into_iter()
        .filter(|n| !service_link(n))
    {
        assert!(
            known.contains(&name),
            "docs/deploy.md: {name} is not a relay setting"
        );
    }
    for needle in [
        "max_slot_wal_keep_size",
        "verify-full",
        "Upgrade and rollback",
    ] {
        assert!(guide.contains(needle), "docs/deploy.md lacks {needle}");
    }
    // Flags the guide names exist on `run`.
    let cmd = <outbox_relay::cli::Cli as clap::CommandFactory>::command();
    let run = cmd.find_subcommand("run").unwrap();
    let mut rest = guide.as_str();
    while let Some(i) = rest.find("`--") {
        let flag: String = rest[i + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !flag.is_empty() {
            assert!(
                run.get_arguments()
                    .any(|a| a.get_long() == Some(flag.as_str())),
                "docs/deploy.md names --{flag}, which `run` does not have"
            );
        }
        rest = &rest[i + 3..];
    }
}

/// Every document of a multi-document YAML file.
fn yaml_documents(rel: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(&read(rel))
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

/// The Kubernetes example: a standby pair whose probes, ports, strategy and
/// settings agree with the relay. (Schema validation: `kubernetes-validate
/// --strict deploy/kubernetes/outbox-relay.yaml`, see docs/deploy.md.)
#[test]
fn kubernetes_example_fits_the_standby_semantics() {
    let docs = yaml_documents("deploy/kubernetes/outbox-relay.yaml");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| str_of(&d["kind"]) == k)
            .unwrap_or_else(|| panic!("no {k} in the Kubernetes example"))
    };
    let deployment = kind("Deployment");
    let service = kind("Service");
    kind("PodDisruptionBudget");
    // The Service is named outbox-relay: its service links must not break the relay.
    assert_eq!(str_of(&service["metadata"]["name"]), "outbox-relay");

    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2, "a standby pair");
    assert_eq!(str_of(&spec["strategy"]["type"]), "RollingUpdate");
    assert_eq!(
        str_of(&spec["strategy"]["rollingUpdate"]["maxUnavailable"]),
        "0"
    );
    let pod = &spec["template"]["spec"];
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap()
            > outbox_relay::config::DEFAULT_SHUTDOWN_TIMEOUT.as_secs()
    );
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(str_of(&c["readinessProbe"]["httpGet"]["path"]), "/readyz");
    assert_eq!(str_of(&c["livenessProbe"]["httpGet"]["path"]), "/healthz");
    let http = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| str_of(&p["name"]) == "http")
        .expect("a container port named http");
    assert_eq!(
        http["containerPort"].as_u64(),
        Some(u64::from(RELAY_HTTP_PORT))
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(str_of(&c[probe]["httpGet"]["port"]), "http", "{probe}");
    }
    assert_eq!(str_of(&service["spec"]["ports"][0]["targetPort"]), "http");

    // The container's settings are the relay's, and they load together with
    // the service links the kubelet adds for the Service (enableServiceLinks
    // off or not).
    let mut env: std::collections::BTreeMap<String, String> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (str_of(&e["name"]), str_of(&e["value"])))
        .collect();
    let known = known_env();
    for name in env.keys() {
        assert!(known.contains(name), "{name} is not a relay setting");
    }
    let listen = &env["OUTBOX_RELAY_HTTP_LISTEN"];
    assert_eq!(listen, &format!("0.0.0.0:{RELAY_HTTP_PORT}"));
    let password_file = PathBuf::from(&env["OUTBOX_RELAY_POSTGRES_PASSWORD_FILE"]);
    let mounts: Vec<String> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| str_of(&m["mountPath"]))
        .collect();
    assert!(
        mounts.iter().any(|m| password_file.starts_with(m)),
        "the password file is on a mounted volume: {mounts:?}"
    );
    // The file does not exist here; the rest must load.
    env.remove("OUTBOX_RELAY_POSTGRES_PASSWORD_FILE");
    for (k, v) in [
        ("OUTBOX_RELAY_SERVICE_HOST", "10.96.0.17"),
        ("OUTBOX_RELAY_SERVICE_PORT", "9187"),
        ("OUTBOX_RELAY_SERVICE_PORT_HTTP", "9187"),
        ("OUTBOX_RELAY_PORT", "tcp://10.96.0.17:9187"),
        ("OUTBOX_RELAY_PORT_9187_TCP", "tcp://10.96.0.17:9187"),
        ("OUTBOX_RELAY_PORT_9187_TCP_PROTO", "tcp"),
        ("OUTBOX_RELAY_PORT_9187_TCP_PORT", "9187"),
        ("OUTBOX_RELAY_PORT_9187_TCP_ADDR", "10.96.0.17"),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    let cli = outbox_relay::cli::try_parse_with_env(["outbox-relay", "run"], &env)
        .expect("the example's settings parse");
    outbox_relay::cli::load_with_env(&cli, &env).expect("the example's settings load");
}

/// Alerts judge a standby pair as a whole: none fires for a standby doing its
/// job (not holding the slot), one fires when no relay of the job streams.
#[test]
fn alert_rules_judge_the_pair() {
    let alerts = yaml("deploy/prometheus/alerts.yml");
    let exprs: Vec<(String, String)> = alerts["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| (str_of(&r["alert"]), str_of(&r["expr"])))
        .collect();
    for (name, expr) in &exprs {
        assert!(
            !expr.contains("outbox_relay_slot_held"),
            "{name} fires on a healthy standby: {expr}"
        );
    }
    assert!(
        exprs
            .iter()
            .any(|(_, e)| e.contains("absent(outbox_relay_streaming{job=\"outbox-relay\"} == 1)")),
        "a rule over the pair: no relay of the job streams"
    );
    assert!(
        exprs
            .iter()
            .any(|(_, e)| e.contains("outbox_relay_slot_sample_age_seconds")),
        "a rule on stale slot samples"
    );
}

/// Kafka keeps its topics on the named volume: every log dir lies under a
/// named volume's mount point (the image's default, /tmp/kraft-combined-logs,
/// is inside the container, so `down && up` lost every topic while the slot,
/// on its own volume, stayed confirmed past them).
#[test]
fn kafka_log_dirs_are_on_the_named_volume() {
    let c = compose();
    let kafka = service(&c, "kafka");
    let dirs = env_value(kafka, "KAFKA_LOG_DIRS");
    let named: Vec<String> = kafka["volumes"]
        .as_sequence()
        .expect("kafka has volumes")
        .iter()
        .map(str_of)
        .filter_map(|v| {
            let (src, rest) = v.split_once(':')?;
            let dst = rest.split(':').next()?;
            let is_named = !src.starts_with('.') && !src.starts_with('/');
            (is_named && c["volumes"].get(src).is_some()).then(|| dst.to_string())
        })
        .collect();
    assert!(!named.is_empty(), "kafka mounts a named volume");
    let metadata = environment(kafka)
        .into_iter()
        .find(|(k, _)| k == "KAFKA_METADATA_LOG_DIR")
        .map(|(_, v)| v);
    for dir in dirs.split(',').chain(metadata.as_deref()) {
        assert!(
            named.iter().any(|m| Path::new(dir).starts_with(m)),
            "log dir {dir} is not on a named volume ({named:?})"
        );
    }
}

/// The image's healthcheck asks /healthz where the relay listens: the
/// `--http-listen` flag on PID 1's command line, else the variable, else the
/// default; a wildcard address is asked on loopback; `off` is healthy.
#[test]
fn healthcheck_follows_http_listen() {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    // A stand-in for the relay's /healthz, answering any number of requests.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in server.incoming().flatten() {
            // Read the whole request head (it may come in pieces).
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let ok = req.starts_with(b"GET /healthz ");
            let status = if ok { "200 OK" } else { "404 Not Found" };
            let _ = write!(conn, "HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: Option<&str>| -> bool {
        let cmdline = dir.path().join("cmdline");
        let mut bytes = Vec::new();
        for a in args {
            bytes.extend_from_slice(a.as_bytes());
            bytes.push(0);
        }
        std::fs::write(&cmdline, bytes).unwrap();
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(root().join("deploy/docker/healthcheck.sh"))
            .arg(&cmdline)
            .env_remove("OUTBOX_RELAY_HTTP_LISTEN");
        if let Some(v) = env {
            cmd.env("OUTBOX_RELAY_HTTP_LISTEN", v);
        }
        cmd.status().unwrap().success()
    };
    let at = |p: u16| format!("0.0.0.0:{p}");
    let (live, dead) = (at(port), at(closed));
    // The flag, in both spellings, beats the variable (the image sets one).
    let bin = "/usr/local/bin/outbox-relay";
    assert!(run(&[bin, "run", "--http-listen", &live], Some(&dead)));
    assert!(run(
        &[bin, "run", &format!("--http-listen={live}")],
        Some(&dead)
    ));
    assert!(!run(&[bin, "run", "--http-listen", &dead], Some(&live)));
    // No flag: the variable.
    assert!(run(&[bin, "run"], Some(&format!("127.0.0.1:{port}"))));
    assert!(!run(&[bin, "run"], Some(&dead)));
    // HTTP off: nothing to ask.
    assert!(run(&[bin, "run", "--http-listen", "off"], Some(&dead)));
}
