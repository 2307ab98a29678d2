//! The Kafka-protocol broker: a tansu process with in-memory storage.
//!
//! tansu does not create topics on first produce (the benchmark creates them
//! through the admin API), its high watermarks are not to be trusted (records
//! are counted by consuming them), and its first idempotent produce takes about
//! half a second (the broker is warmed up before anything is timed).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::cluster::{free_port, port_accepts, tail};
use crate::process::{self, Guarded, TempDir};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The tansu binary: `--tansu`, `$OUTBOX_RELAY_TANSU`, cargo's bin dir, `PATH`.
pub fn find_tansu(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("OUTBOX_RELAY_TANSU") {
        return Ok(PathBuf::from(p));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut candidates: Vec<PathBuf> = cargo_home
        .map(|c| c.join("bin/tansu"))
        .into_iter()
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "the tansu broker was not found (--tansu, OUTBOX_RELAY_TANSU, $CARGO_HOME/bin, PATH); \
             run `.ci/install-deps`"
            .to_string()
    })
}

pub struct Broker {
    pub port: u16,
    pub version: String,
    server: Guarded,
    dir: TempDir,
}

impl Broker {
    pub fn start(binary: &Path, work_dir: &Path, keep: bool) -> Result<Broker, String> {
        let dir = TempDir::new(work_dir, "outbox-bench-tansu-", keep)
            .map_err(|e| format!("create a temp dir in {}: {e}", work_dir.display()))?;
        let version = Command::new(binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let log_path = dir.path().join("tansu.log");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port().map_err(|e| format!("find a free port: {e}"))?;
            let log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| format!("open {}: {e}", log_path.display()))?;
            let log2 = log.try_clone().map_err(|e| e.to_string())?;
            let listener = format!("tcp://127.0.0.1:{port}");
            let mut cmd = Command::new(binary);
            cmd.args(["broker", "--cluster-id", "bench", "--listener-url"])
                .arg(&listener)
                .arg("--advertised-listener-url")
                .arg(&listener)
                .args(["--storage-engine", "memory://tansu/"])
                .current_dir(dir.path())
                .env("RUST_LOG", "warn")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            let mut server = process::spawn("tansu", &mut cmd, libc::SIGTERM)
                .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
            let deadline = Instant::now() + START_TIMEOUT;
            let ready = loop {
                if let Some(s) = server.try_status() {
                    break Err(format!("tansu exited with {s}"));
                }
                let text = String::from_utf8_lossy(&fs::read(&log_path).unwrap_or_default())
                    .get(log_start as usize..)
                    .unwrap_or("")
                    .to_string();
                if text.contains("AddrInUse") {
                    break Err("port taken".into());
                }
                if text.contains("ready in") && port_accepts(port) {
                    break Ok(());
                }
                if Instant::now() >= deadline {
                    break Err(format!("not ready within {START_TIMEOUT:?}"));
                }
                std::thread::sleep(Duration::from_millis(25));
            };
            match ready {
                Ok(()) => {
                    let broker = Broker {
                        port,
                        version,
                        server,
                        dir,
                    };
                    broker.wait_metadata()?;
                    return Ok(broker);
                }
                Err(e) => {
                    server.kill9();
                    last_err = e;
                }
            }
        }
        Err(format!(
            "tansu did not start: {last_err}\n--- log ---\n{}",
            tail(&log_path, 40)
        ))
    }

    fn wait_metadata(&self) -> Result<(), String> {
        let consumer: BaseConsumer = self
            .client_config()
            .create()
            .map_err(|e| format!("create a metadata client: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if matches!(consumer.fetch_metadata(None, Duration::from_secs(2)), Ok(md) if !md.brokers().is_empty())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("tansu does not answer metadata requests".into());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", self.bootstrap());
        cfg
    }

    /// Creates `topic` (1 partition; an existing one is fine) and waits until
    /// metadata shows it.
    pub async fn create_topic(&self, topic: &str) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(|e| format!("create an admin client: {e}"))?;
        let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
        let opts = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(30)))
            .operation_timeout(Some(Duration::from_secs(30)));
        for r in admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| format!("create topic {topic}: {e}"))?
        {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("create topic {t}: {code:?}")),
            }
        }
        let cfg = self.client_config();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let probe: BaseConsumer = cfg.create().map_err(|e| e.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(md) = probe.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                    if md.topics().iter().any(|t| {
                        t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                    }) {
                        return Ok(());
                    }
                }
                if Instant::now() >= deadline {
                    return Err(format!("topic {topic} not in metadata after 30 s"));
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Deletes topics to give tansu its memory back; errors are ignored.
    pub async fn delete_topics(&self, topics: &[String]) {
        let Ok(admin) = self
            .client_config()
            .create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let _ = admin.delete_topics(&names, &opts).await;
    }

    /// One idempotent produce to a scratch topic: tansu's first is slow.
    pub async fn warm_up(&self) -> Result<(), String> {
        let topic = "bench.warm_up";
        self.create_topic(topic).await?;
        let producer: FutureProducer = self
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| format!("create a producer: {e}"))?;
        for _ in 0..3 {
            producer
                .send(
                    FutureRecord::to(topic).key("k").payload("warm-up"),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| format!("warm-up produce: {e}"))?;
        }
        Ok(())
    }
}
