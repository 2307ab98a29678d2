//! A tansu broker (Kafka protocol) as a child process, its clients, and the
//! faults a test or the benchmark puts it through (pause, kill, restart).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::pg::{start_exit, StartError};
use crate::process::{
    self, dispose_temp_dir, dump_log_if_panicking, free_port, kill9_and_reap, open_log,
    port_accepts, read_lossy, signal, tail, temp_dir, unique_name, wait_all_threads_stopped,
};
use crate::{POLL_INTERVAL, START_TIMEOUT};

/// Where tansu keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerStorage {
    /// `memory://tansu/` (needs tansu's `dynostore` feature): lost on restart.
    Memory,
    /// `sqlite://tansu.db` in the broker's working dir: survives restarts.
    Sqlite,
}

impl BrokerStorage {
    fn url(self) -> &'static str {
        match self {
            BrokerStorage::Memory => "memory://tansu/",
            BrokerStorage::Sqlite => "sqlite://tansu.db",
        }
    }
}

/// The tansu binary: `$OUTBOX_RELAY_TANSU`, cargo's bin dir, then `PATH`.
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTBOX_RELAY_TANSU") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "OUTBOX_RELAY_TANSU={} does not exist; run `.ci/install-deps`",
            p.display()
        );
        return p;
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
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
            "the tansu broker binary was not found (OUTBOX_RELAY_TANSU, $CARGO_HOME/bin, PATH); \
             run `.ci/install-deps` to install tansu 0.6.0"
        )
        })
}

/// One record read back from the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Headers in record order; a null header value reads as an empty vec.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Create/append time in ms since the epoch, when the record has one.
    pub timestamp: Option<i64>,
}

impl Consumed {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The value of the first header named `name`, as UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .map(|v| std::str::from_utf8(v).expect("header value is UTF-8"))
    }
}

/// A tansu broker process. `Drop` kills it and removes its working dir.
pub struct Broker {
    binary: PathBuf,
    storage: BrokerStorage,
    dir: Option<tempfile::TempDir>,
    port: u16,
    child: Option<Child>,
    paused: bool,
}

impl Broker {
    /// A broker with `memory://` storage (data lost on restart).
    pub fn start_memory() -> Broker {
        Broker::start(BrokerStorage::Memory)
    }

    /// A broker with `sqlite://tansu.db` storage in its temp dir (data survives restart).
    pub fn start_sqlite() -> Broker {
        Broker::start(BrokerStorage::Sqlite)
    }

    pub fn start(storage: BrokerStorage) -> Broker {
        Broker::start_with(
            tansu_binary(),
            storage,
            temp_dir("outbox-relay-tansu-"),
            |_| {},
            "",
        )
    }

    /// A broker run by `binary` (tansu or a wrapper that `exec`s it) with its
    /// working dir `dir`; `before_spawn` gets each port tried before tansu is
    /// started on it; `what` is added to the panic message should it not start.
    pub fn start_with(
        binary: PathBuf,
        storage: BrokerStorage,
        dir: tempfile::TempDir,
        mut before_spawn: impl FnMut(u16),
        what: &str,
    ) -> Broker {
        let mut broker = Broker {
            binary,
            storage,
            dir: Some(dir),
            port: 0,
            child: None,
            paused: false,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            broker.port = free_port();
            before_spawn(broker.port);
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(StartError::PortTaken) if attempts < 5 => continue,
                Err(e) => panic!(
                    "tansu ({storage:?}{what}) did not start: {e}\n--- log ---\n{}",
                    tail(&broker.log(), 60)
                ),
            }
        }
    }

    /// What `tansu --version` prints (for a report).
    pub fn version(&self) -> String {
        Command::new(&self.binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    fn root(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("broker dir present until drop")
            .path()
    }

    /// The command line the harness runs tansu with (for the report and debugging).
    pub fn command_line(&self) -> Vec<String> {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        vec![
            self.binary.display().to_string(),
            "broker".into(),
            "--cluster-id".into(),
            "outbox-relay-test".into(),
            "--listener-url".into(),
            listener.clone(),
            "--advertised-listener-url".into(),
            listener,
            "--storage-engine".into(),
            self.storage.url().into(),
        ]
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        assert!(self.child.is_none(), "tansu is already running");
        let log_path = self.log_path();
        let log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let (out, err) = open_log(&log_path);
        let argv = self.command_line();
        let log_filter =
            std::env::var("OUTBOX_RELAY_TANSU_LOG").unwrap_or_else(|_| "warn".to_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(self.root())
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = process::spawn(&mut cmd, libc::SIGKILL)
            .unwrap_or_else(|e| panic!("spawn {}: {e}", argv[0]));
        self.child = Some(child);
        self.paused = false;

        let deadline = Instant::now() + START_TIMEOUT;
        // tansu prints "ready in Nms" once its listener is bound (and, on a taken port,
        // logs AddrInUse, panics a worker and exits 0). Wait for that line of THIS run,
        // then for the port, then for a real metadata round trip: the port alone could
        // be another test's server that grabbed it.
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = process::try_reap(child) {
                self.child = None;
                return Err(start_exit(
                    &log_path,
                    log_start,
                    status,
                    &["AddrInUse", "in use"],
                ));
            }
            let log = read_lossy(&log_path);
            let this_run = log.get(log_start as usize..).unwrap_or(&log);
            if this_run.contains("ready in") && port_accepts(self.port) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let consumer = self.base_consumer();
        loop {
            let ok = matches!(
                consumer.fetch_metadata(None, Duration::from_secs(2)),
                Ok(md) if !md.brokers().is_empty()
            );
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = process::try_reap(child) {
                self.child = None;
                return Err(StartError::Exited(status));
            }
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `127.0.0.1:PORT`
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn storage(&self) -> BrokerStorage {
        self.storage
    }

    pub fn log_path(&self) -> PathBuf {
        self.root().join("tansu.log")
    }

    /// The broker log so far (all starts).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGSTOP: the broker keeps its sockets but answers nothing until `resume`.
    pub fn pause(&mut self) {
        let child = self.child.as_ref().expect("pause: tansu is not running");
        signal(child, libc::SIGSTOP);
        wait_all_threads_stopped(child.id());
        self.paused = true;
    }

    /// SIGCONT after `pause`.
    pub fn resume(&mut self) {
        let child = self.child.as_ref().expect("resume: tansu is not running");
        signal(child, libc::SIGCONT);
        self.paused = false;
    }

    /// SIGKILL and reap; storage is left as the crash left it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_and_reap(&mut child);
        }
        self.paused = false;
    }

    /// Kills the broker if it runs, then starts it again on the same port with the
    /// same storage and waits until it answers metadata requests. With sqlite storage
    /// the data survives; with memory storage it is gone (topics included).
    pub fn restart(&mut self) {
        self.kill9();
        if let Err(e) = self.spawn_and_wait() {
            panic!(
                "tansu did not start again on port {}: {e}\n--- log ---\n{}",
                self.port,
                tail(&self.log(), 60)
            );
        }
    }

    /// A client config pointing at this broker.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", self.bootstrap());
        cfg
    }

    fn base_consumer(&self) -> BaseConsumer {
        self.client_config()
            .set("group.id", unique_name("harness"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // tansu's watermarks/LSO are not to be trusted; idempotent producers only.
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("create rdkafka consumer")
    }

    /// An idempotent producer (acks=all), as the relay is configured.
    pub fn producer(&self) -> FutureProducer {
        self.client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .expect("create rdkafka producer")
    }

    /// Creates `name` with `partitions` partitions (replication factor 1) through the
    /// admin API and waits until metadata shows it. Panics on any error.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        if let Err(e) = self.try_create_topic(name, partitions).await {
            panic!("create topic {name}: {e}");
        }
    }

    /// Like [`create_topic`](Self::create_topic), returning the broker's error code.
    pub async fn try_create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .expect("create rdkafka admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(30)))
            .operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| e.to_string())?;
        for r in results {
            if let Err((topic, code)) = r {
                return Err(format!("{topic}: {code:?} ({code})"));
            }
        }
        let name = name.to_string();
        let bootstrap = self.bootstrap();
        tokio::task::spawn_blocking(move || {
            let consumer = partition_probe(&bootstrap);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if topic_partitions(&consumer, &name).len() as i32 >= partitions {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "topic {name} created but not in metadata after 30 s"
                    ));
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        })
        .await
        .expect("metadata probe task")
    }

    /// One idempotent produce to a scratch topic: tansu's first one is slow (~0.5 s),
    /// so latency-sensitive tests call this first.
    pub async fn warm_up(&self) {
        let topic = unique_name("harness_warm_up");
        self.create_topic(&topic, 1).await;
        let producer = self.producer();
        producer
            .send(
                FutureRecord::to(&topic).key("k").payload("warm-up"),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("warm-up produce to {topic}: {e}"));
    }

    /// Reads `topic` from the beginning of all its partitions until `expected` records
    /// were seen or `timeout` passed, and returns what it read (possibly more than
    /// `expected` if they arrived in the same poll; fewer on timeout). Waits for the
    /// topic to exist. Counts by consuming, never by watermarks.
    pub async fn consume(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<Consumed> {
        let bootstrap = self.bootstrap();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            consume_blocking(&bootstrap, &topic, Some(expected), timeout)
        })
        .await
        .expect("consumer task")
    }

    /// Reads everything `topic` holds, and receives, during `duration`: to prove that
    /// nothing beyond what is expected arrives.
    pub async fn consume_for(&self, topic: &str, duration: Duration) -> Vec<Consumed> {
        let bootstrap = self.bootstrap();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || consume_blocking(&bootstrap, &topic, None, duration))
            .await
            .expect("consumer task")
    }

    /// Blocking [`consume`](Self::consume).
    pub fn consume_blocking(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> Vec<Consumed> {
        consume_blocking(&self.bootstrap(), topic, Some(expected), timeout)
    }

    /// Blocking [`consume_for`](Self::consume_for).
    pub fn consume_for_blocking(&self, topic: &str, duration: Duration) -> Vec<Consumed> {
        consume_blocking(&self.bootstrap(), topic, None, duration)
    }

    /// Deletes `topics` (to give a memory-backed broker its memory back); errors
    /// are ignored.
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

    /// The topic's partition ids from metadata (empty when it does not exist).
    pub fn partitions(&self, topic: &str) -> Vec<i32> {
        topic_partitions(&partition_probe(&self.bootstrap()), topic)
    }
}

impl Broker {
    /// Whether the broker process is stopped by [`pause`](Self::pause).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Adds the index tansu 0.6.0's sqlite schema lacks, then restarts the broker.
    ///
    /// Its fetch reads each record's headers with `... from header h join record r
    /// ... where r.offset_id = $4`, and `header` has no index on (topition,
    /// offset_id): every record fetched scans every header of the database, so
    /// reading back tens of thousands of records (five headers each) takes hours
    /// instead of seconds. The index is created with Python's `sqlite3` module
    /// (`python3` is installed by `.ci/install-deps`), or the `sqlite3` CLI.
    pub fn add_sqlite_header_index(&mut self) {
        assert_eq!(
            self.storage,
            BrokerStorage::Sqlite,
            "only for sqlite storage"
        );
        let db = self.root().join("tansu.db");
        let sql = "CREATE INDEX IF NOT EXISTS outbox_relay_test_header_record \
                   ON header (topition, offset_id)";
        let python = Command::new("python3")
            .arg("-c")
            .arg(
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1], timeout=30)\n\
                 c.execute(sys.argv[2])\n\
                 c.commit()\n",
            )
            .arg(&db)
            .arg(sql)
            .output();
        let ok = match python {
            Ok(out) if out.status.success() => true,
            _ => Command::new("sqlite3")
                .args(["-cmd", ".timeout 30000"])
                .arg(&db)
                .arg(sql)
                .output()
                .is_ok_and(|out| out.status.success()),
        };
        assert!(
            ok,
            "could not add the header index to {} (needs python3 or sqlite3)",
            db.display()
        );
        self.restart();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_and_reap(&mut child);
        }
        let log_path = self.log_path();
        dump_log_if_panicking("tansu", &log_path);
        if let Some(dir) = self.dir.take() {
            dispose_temp_dir(dir, "tansu");
        }
    }
}

fn partition_probe(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("harness_probe"))
        .create()
        .expect("create rdkafka metadata client")
}

fn topic_partitions(consumer: &BaseConsumer, topic: &str) -> Vec<i32> {
    topic_partitions_within(consumer, topic, Duration::from_secs(5))
}

fn topic_partitions_within(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Vec<i32> {
    match consumer.fetch_metadata(Some(topic), timeout.max(Duration::from_millis(100))) {
        Ok(md) => md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn consume_blocking(
    bootstrap: &str,
    topic: &str,
    expected: Option<usize>,
    timeout: Duration,
) -> Vec<Consumed> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("harness_consume"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("create rdkafka consumer");

    // The relay creates topics lazily: wait (within the deadline) for the topic.
    let partitions = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let p = topic_partitions_within(&consumer, topic, left.min(Duration::from_secs(5)));
        if !p.is_empty() {
            break p;
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("add partition to assignment");
    }
    consumer.assign(&tpl).expect("assign partitions");

    let mut out = Vec::new();
    loop {
        if expected.is_some_and(|n| out.len() >= n) {
            return out;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match consumer.poll(left.min(Duration::from_millis(100))) {
            None => {}
            Some(Ok(m)) => out.push(Consumed {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp: m.timestamp().to_millis(),
            }),
            // Transient fetch errors (e.g. a paused or restarting broker) are retried
            // by librdkafka; report them and keep polling until the deadline.
            Some(Err(e)) if e.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) => {
                eprintln!("[harness] consume {topic}: {e}");
            }
            Some(Err(_)) => {}
        }
    }
}
