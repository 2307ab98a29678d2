//! Kafka TLS and SASL as typed settings (`kafka.security_protocol`, `ssl_ca`, ...),
//! checked together and rendered into the librdkafka properties the producer gets.
//!
//! They are sugar over `kafka.properties`: the same librdkafka keys, but spelled
//! once, validated, with the password kept out of flags. A key set both ways is an
//! error rather than a silent precedence rule.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Problem, ENV_KAFKA_SASL_PASSWORD};

/// librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum KafkaSecurityProtocol {
    #[serde(alias = "PLAINTEXT", rename = "plaintext")]
    #[value(name = "plaintext")]
    Plaintext,
    #[serde(alias = "SSL", rename = "ssl")]
    #[value(name = "ssl")]
    Ssl,
    #[serde(alias = "SASL_PLAINTEXT", rename = "sasl_plaintext")]
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    #[serde(alias = "SASL_SSL", rename = "sasl_ssl")]
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl KafkaSecurityProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSecurityProtocol::Plaintext => "plaintext",
            KafkaSecurityProtocol::Ssl => "ssl",
            KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn tls(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::Ssl | KafkaSecurityProtocol::SaslSsl
        )
    }

    fn sasl(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl
        )
    }
}

/// librdkafka's `sasl.mechanism` (the ones that need only a user name and password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum KafkaSaslMechanism {
    #[serde(rename = "PLAIN")]
    #[value(name = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSaslMechanism::Plain => "PLAIN",
            KafkaSaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            KafkaSaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The typed settings as resolved from all layers; the password already read.
#[derive(Clone, Default, PartialEq)]
pub(super) struct KafkaSecurity {
    pub protocol: Option<KafkaSecurityProtocol>,
    pub ssl_ca: Option<PathBuf>,
    pub ssl_cert: Option<PathBuf>,
    pub ssl_key: Option<PathBuf>,
    pub sasl_mechanism: Option<KafkaSaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
}

impl fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.protocol)
            .field("ssl_ca", &self.ssl_ca)
            .field("ssl_cert", &self.ssl_cert)
            .field("ssl_key", &self.ssl_key)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn setting(key: &str, flag: &str) -> String {
    format!("kafka.{key} (--{flag})")
}

impl KafkaSecurity {
    fn any_ssl(&self) -> bool {
        self.ssl_ca.is_some() || self.ssl_cert.is_some() || self.ssl_key.is_some()
    }

    fn any_sasl(&self) -> bool {
        self.sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password.is_some()
    }

    /// Checks the settings together and writes them into `props` as librdkafka
    /// properties; every problem is returned.
    pub(super) fn apply(&self, props: &mut BTreeMap<String, String>) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.protocol.is_none() && !self.any_ssl() && !self.any_sasl() {
            return out;
        }
        let protocol = match self.protocol {
            Some(p) => p,
            None if self.any_sasl() => {
                out.push(Problem::new(
                    "Kafka SASL settings are given, but no security protocol",
                    format!(
                        "set {} to sasl_ssl (or sasl_plaintext, which sends credentials \
                         unencrypted, on a trusted network only)",
                        setting("security_protocol", "kafka-security-protocol")
                    ),
                ));
                return out;
            }
            None => KafkaSecurityProtocol::Ssl,
        };
        if self.any_ssl() && !protocol.tls() {
            out.push(Problem::new(
                format!(
                    "Kafka TLS files are given, but the security protocol is {}",
                    protocol.as_str()
                ),
                format!(
                    "set {} to ssl or sasl_ssl, or drop the ssl_* settings",
                    setting("security_protocol", "kafka-security-protocol")
                ),
            ));
        }
        if self.any_sasl() && !protocol.sasl() {
            out.push(Problem::new(
                format!(
                    "Kafka SASL settings are given, but the security protocol is {}",
                    protocol.as_str()
                ),
                format!(
                    "set {} to sasl_ssl, or drop the sasl_* settings",
                    setting("security_protocol", "kafka-security-protocol")
                ),
            ));
        }
        if protocol.sasl() {
            if self.sasl_mechanism.is_none() {
                out.push(Problem::new(
                    format!(
                        "security protocol {} needs a SASL mechanism",
                        protocol.as_str()
                    ),
                    format!(
                        "set {} to PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                        setting("sasl_mechanism", "kafka-sasl-mechanism")
                    ),
                ));
            }
            if self.sasl_username.as_deref().map_or(true, str::is_empty) {
                out.push(Problem::new(
                    format!(
                        "security protocol {} needs a SASL user name",
                        protocol.as_str()
                    ),
                    format!("set {}", setting("sasl_username", "kafka-sasl-username")),
                ));
            }
            if self.sasl_password.is_none() {
                out.push(Problem::new(
                    format!(
                        "security protocol {} needs a SASL password",
                        protocol.as_str()
                    ),
                    format!(
                        "set {ENV_KAFKA_SASL_PASSWORD}, or {} to a file holding it",
                        setting("sasl_password_file", "kafka-sasl-password-file")
                    ),
                ));
            }
        }
        if self.ssl_cert.is_some() != self.ssl_key.is_some() {
            out.push(Problem::new(
                "only one of kafka.ssl_cert and kafka.ssl_key is set",
                "set both (--kafka-ssl-cert and --kafka-ssl-key): the client certificate and its key",
            ));
        }
        for (path, key, flag) in [
            (&self.ssl_ca, "ssl_ca", "kafka-ssl-ca"),
            (&self.ssl_cert, "ssl_cert", "kafka-ssl-cert"),
            (&self.ssl_key, "ssl_key", "kafka-ssl-key"),
        ] {
            if let Some(path) = path {
                if let Err(e) = std::fs::File::open(path) {
                    out.push(Problem::new(
                        format!("cannot read {} {}: {e}", setting(key, flag), path.display()),
                        "fix the path or the file's permissions (the relay's user must read it)",
                    ));
                }
            }
        }
        if !out.is_empty() {
            return out;
        }
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let rendered = [
            (
                "security.protocol",
                Some(protocol.as_str().to_string()),
                "security_protocol",
            ),
            ("ssl.ca.location", path(&self.ssl_ca), "ssl_ca"),
            ("ssl.certificate.location", path(&self.ssl_cert), "ssl_cert"),
            ("ssl.key.location", path(&self.ssl_key), "ssl_key"),
            (
                "sasl.mechanism",
                self.sasl_mechanism.map(|m| m.as_str().to_string()),
                "sasl_mechanism",
            ),
            ("sasl.username", self.sasl_username.clone(), "sasl_username"),
            ("sasl.password", self.sasl_password.clone(), "sasl_password"),
        ];
        for (property, value, key) in rendered {
            let Some(value) = value else { continue };
            if props.contains_key(property) {
                out.push(Problem::new(
                    format!(
                        "Kafka property {property} is set twice: as a property and as kafka.{key}"
                    ),
                    format!("remove the {property} property and keep kafka.{key}"),
                ));
            } else {
                props.insert(property.to_string(), value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec() -> KafkaSecurity {
        KafkaSecurity {
            protocol: Some(KafkaSecurityProtocol::SaslSsl),
            sasl_mechanism: Some(KafkaSaslMechanism::ScramSha512),
            sasl_username: Some("relay".into()),
            sasl_password: Some("pw".into()),
            ..Default::default()
        }
    }

    #[test]
    fn renders_librdkafka_properties() {
        let mut props = BTreeMap::from([("linger.ms".to_string(), "5".to_string())]);
        assert_eq!(sec().apply(&mut props), vec![]);
        assert_eq!(props["security.protocol"], "sasl_ssl");
        assert_eq!(props["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(props["sasl.username"], "relay");
        assert_eq!(props["sasl.password"], "pw");
        assert_eq!(props["linger.ms"], "5");
        let mut props = BTreeMap::new();
        assert_eq!(KafkaSecurity::default().apply(&mut props), vec![]);
        assert!(props.is_empty(), "nothing set, nothing rendered");
    }

    #[test]
    fn problems_are_listed_with_fixes() {
        let text = |s: KafkaSecurity, props: &[(&str, &str)]| -> Vec<String> {
            let mut props = props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            s.apply(&mut props).iter().map(|p| p.to_string()).collect()
        };
        let t = text(
            KafkaSecurity {
                protocol: None,
                ..sec()
            },
            &[],
        );
        assert!(
            t[0].contains("no security protocol") && t[0].contains("sasl_ssl"),
            "{t:?}"
        );
        let t = text(
            KafkaSecurity {
                sasl_password: None,
                sasl_username: None,
                sasl_mechanism: None,
                ..sec()
            },
            &[],
        );
        assert_eq!(t.len(), 3, "{t:?}");
        assert!(t[2].contains(ENV_KAFKA_SASL_PASSWORD));
        let t = text(
            KafkaSecurity {
                protocol: Some(KafkaSecurityProtocol::Ssl),
                ..sec()
            },
            &[],
        );
        assert!(t[0].contains("protocol is ssl"), "{t:?}");
        let t = text(sec(), &[("sasl.username", "other")]);
        assert!(t[0].contains("set twice"), "{t:?}");
        let t = text(
            KafkaSecurity {
                ssl_ca: Some("/nonexistent/ca.pem".into()),
                ..sec()
            },
            &[],
        );
        assert!(t[0].contains("/nonexistent/ca.pem"), "{t:?}");
        // TLS files alone mean protocol ssl.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let mut props = BTreeMap::new();
        let s = KafkaSecurity {
            ssl_ca: Some(ca),
            ..Default::default()
        };
        assert_eq!(s.apply(&mut props), vec![]);
        assert_eq!(props["security.protocol"], "ssl");
    }

    #[test]
    fn debug_redacts_the_password() {
        assert!(!format!("{:?}", sec()).contains("pw\""));
    }
}
