//! Security fixtures: a throwaway PKI (rcgen), a PostgreSQL cluster that accepts
//! TCP only over TLS, and a tansu broker with SASL/SCRAM users.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use super::{free_port, tansu_binary, PgCluster, PgVersion, ShutdownMode};

pub const SCRAM_USER: &str = "tls_scram";
pub const CERT_USER: &str = "tls_cert";
pub const PASSWORD: &str = "tls-test-password";

/// A CA, a server certificate for localhost/127.0.0.1, a client certificate for
/// CERT_USER, and an unrelated CA, as PEM files in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params("outbox-relay test CA")
            .self_signed(&ca_key)
            .unwrap();
        let other_key = KeyPair::generate().unwrap();
        let other = ca_params("some other CA").self_signed(&other_key).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = params.signed_by(&server_key, &ca, &ca_key).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, CERT_USER);
        let client = params.signed_by(&client_key, &ca, &ca_key).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", &ca.pem());
        write("other-ca.pem", &other.pem());
        write("client.pem", &client.pem());
        write("client.key", &client_key.serialize_pem());
        Pki {
            ca: ca.pem(),
            server_cert: server.pem(),
            server_key: server_key.serialize_pem(),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A cluster that accepts TCP connections only over TLS: SCRAM for SCRAM_USER,
/// client certificates for CERT_USER.
pub async fn tls_cluster(version: PgVersion, pki: &Pki) -> PgCluster {
    let mut pg = PgCluster::start(version, &[]);
    pg.write_data_file("server.crt", pki.server_cert.as_bytes(), 0o644);
    pg.write_data_file("server.key", pki.server_key.as_bytes(), 0o600);
    pg.write_data_file("root.crt", pki.ca.as_bytes(), 0o644);
    pg.append_conf(&[
        ("ssl", "on"),
        ("ssl_cert_file", "server.crt"),
        ("ssl_key_file", "server.key"),
        ("ssl_ca_file", "root.crt"),
        ("password_encryption", "scram-sha-256"),
    ]);
    pg.set_hba(&[
        "local all all trust",
        &format!("hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256"),
        &format!("hostssl all {CERT_USER} 127.0.0.1/32 cert"),
    ]);
    pg.restart(ShutdownMode::Fast);
    let admin = pg.socket_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {SCRAM_USER} LOGIN REPLICATION PASSWORD '{PASSWORD}';
             CREATE ROLE {CERT_USER} LOGIN REPLICATION;"
        ))
        .await
        .unwrap();
    pg
}

/// A tansu broker with SASL (`--authentication`), users created through its own
/// CLI while it ran without authentication on the same storage. SCRAM only: PLAIN
/// does not complete against tansu 0.6.
pub struct SaslBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl SaslBroker {
    pub fn start(users: &[(&str, &str, &str)]) -> SaslBroker {
        let mut broker = SaslBroker {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            child: None,
        };
        broker.spawn(false);
        for (user, password, mechanism) in users {
            let out = Command::new(tansu_binary())
                .args(["user", "create", "--broker"])
                .arg(format!("tcp://127.0.0.1:{}", broker.port))
                .args([*user, *password, "--mechanism", mechanism])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(out.status.success(), "tansu user create: {out:?}");
        }
        broker.stop();
        broker.spawn(true);
        broker
    }

    fn spawn(&mut self, authentication: bool) {
        let log = std::fs::File::create(self.dir.path().join("tansu.log")).unwrap();
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(tansu_binary());
        cmd.args(["broker", "--cluster-id", "tls-test", "--listener-url"])
            .arg(&listener)
            .arg("--advertised-listener-url")
            .arg(&listener)
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if authentication {
            cmd.arg("--authentication");
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("ready in") {
            assert!(
                Instant::now() < deadline,
                "tansu did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for SaslBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
