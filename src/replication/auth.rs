//! Startup and authentication: StartupMessage, trust / cleartext / md5 /
//! SCRAM-SHA-256(-PLUS), then ParameterStatus and BackendKeyData up to the first
//! ReadyForQuery.

use std::collections::HashMap;

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;

use super::backend::{AuthRequest, BackendMessage};
use super::connection::Connection;
use super::tls::ChannelBindingMode;
use super::{ConnectConfig, ReplicationError};

/// Pins the session settings that shape text output, so values read from the
/// connection do not depend on server, database or role defaults
/// (`bytea_output = escape` set on the role would otherwise garble bytea
/// payloads, which the mapper decodes from hex).
const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres \
     -c extra_float_digits=3 -c bytea_output=hex";

/// What the server told us while starting the session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) server_version_num: u32,
    pub(crate) backend_pid: i32,
    pub(crate) parameters: HashMap<String, String>,
    pub(crate) sasl_mechanism: Option<&'static str>,
}

/// Run the startup exchange on a freshly opened connection.
pub(crate) async fn startup(
    conn: &mut Connection,
    cfg: &ConnectConfig,
) -> Result<Session, ReplicationError> {
    frontend::startup_message(
        [
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", cfg.application_name.as_str()),
            // Error texts and simple_query results are read as UTF-8.
            ("client_encoding", "UTF8"),
            ("options", SESSION_OPTIONS),
        ],
        conn.out(),
    )?;
    conn.flush().await?;

    let sasl_mechanism = authenticate(conn, cfg).await?;

    let mut parameters = HashMap::new();
    let mut backend_pid = None;
    loop {
        match conn.recv().await? {
            BackendMessage::ParameterStatus { name, value } => {
                parameters.insert(name, value);
            }
            BackendMessage::BackendKeyData { process_id } => backend_pid = Some(process_id),
            BackendMessage::ReadyForQuery { .. } => break,
            BackendMessage::ErrorResponse(e) => return Err(ReplicationError::Server(e)),
            BackendMessage::NegotiateProtocolVersion { newest_minor } => {
                tracing::debug!(newest_minor, "server negotiated protocol version down");
            }
            other => return Err(other.unexpected("session startup")),
        }
    }

    let server_version_num = server_version_num(&parameters)?;
    let backend_pid = backend_pid.ok_or_else(|| {
        ReplicationError::Protocol("server finished startup without sending BackendKeyData".into())
    })?;
    Ok(Session {
        server_version_num,
        backend_pid,
        parameters,
        sasl_mechanism,
    })
}

/// Answers the server's authentication requests until AuthenticationOk; returns
/// the SASL mechanism used, if any.
async fn authenticate(
    conn: &mut Connection,
    cfg: &ConnectConfig,
) -> Result<Option<&'static str>, ReplicationError> {
    let mut mechanism = None;
    loop {
        let request = match conn.recv().await? {
            BackendMessage::Authentication(request) => request,
            BackendMessage::ErrorResponse(e) => return Err(ReplicationError::Server(e)),
            BackendMessage::NegotiateProtocolVersion { newest_minor } => {
                tracing::debug!(newest_minor, "server negotiated protocol version down");
                continue;
            }
            other => return Err(other.unexpected("authentication")),
        };
        match request {
            AuthRequest::Ok => {
                // libpq: with channel_binding=require, a server that lets us in
                // without binding (trust, password, md5, cert) is not trusted.
                if cfg.tls.channel_binding == ChannelBindingMode::Require
                    && mechanism != Some(SCRAM_SHA_256_PLUS)
                {
                    return Err(ReplicationError::Auth(format!(
                        "channel_binding=require, but the server authenticated user \"{}\" \
                         without channel binding; use scram-sha-256 over TLS in pg_hba.conf \
                         (hostssl), or relax channel_binding in postgres.url",
                        cfg.user
                    )));
                }
                return Ok(mechanism);
            }
            AuthRequest::CleartextPassword => {
                let password = password(cfg, "password")?;
                frontend::password_message(password.as_bytes(), conn.out())?;
                conn.flush().await?;
            }
            AuthRequest::Md5Password { salt } => {
                let password = password(cfg, "md5")?;
                let hash = md5_hash(cfg.user.as_bytes(), password.as_bytes(), salt);
                frontend::password_message(hash.as_bytes(), conn.out())?;
                conn.flush().await?;
            }
            AuthRequest::Sasl { mechanisms } => {
                mechanism = Some(scram_sha_256(conn, cfg, &mechanisms).await?);
            }
            AuthRequest::SaslContinue(_) | AuthRequest::SaslFinal(_) => {
                return Err(ReplicationError::Protocol(
                    "server sent a SASL continuation before SASL started".into(),
                ))
            }
            AuthRequest::Unsupported(code) => {
                return Err(ReplicationError::Auth(format!(
                    "the server asks for {} authentication for user \"{}\", which outbox-relay \
                     does not support; use scram-sha-256, md5, password or trust in pg_hba.conf",
                    method_name(code),
                    cfg.user
                )))
            }
        }
    }
}

/// SCRAM-SHA-256, bound to the TLS channel when it can be (RFC 5802 gs2 header):
/// - TLS, the server offers SCRAM-SHA-256-PLUS, we have the certificate hash:
///   SCRAM-SHA-256-PLUS with `p=tls-server-end-point`;
/// - TLS, the server does not offer PLUS: `y,,` ("I could bind, you don't"), so a
///   man in the middle who strips PLUS from the offer is detected by the server;
/// - no TLS, or channel binding disabled, or no hash for the certificate: `n,,`.
///
/// Returns the mechanism used.
async fn scram_sha_256(
    conn: &mut Connection,
    cfg: &ConnectConfig,
    mechanisms: &[String],
) -> Result<&'static str, ReplicationError> {
    let offers = |m: &str| mechanisms.iter().any(|o| o == m);
    let mode = cfg.tls.channel_binding;
    let tls = conn.tls().filter(|_| mode != ChannelBindingMode::Disable);
    let end_point = tls.and_then(|t| t.server_end_point.clone());
    let (binding, mechanism) = match (tls, end_point) {
        (Some(_), Some(hash)) if offers(SCRAM_SHA_256_PLUS) => (
            ChannelBinding::tls_server_end_point(hash),
            SCRAM_SHA_256_PLUS,
        ),
        (Some(_), None) if offers(SCRAM_SHA_256_PLUS) => {
            (ChannelBinding::unsupported(), SCRAM_SHA_256)
        }
        (Some(_), _) => (ChannelBinding::unrequested(), SCRAM_SHA_256),
        (None, _) => (ChannelBinding::unsupported(), SCRAM_SHA_256),
    };
    if mode == ChannelBindingMode::Require && mechanism != SCRAM_SHA_256_PLUS {
        let why = if conn.tls().is_none() {
            "the connection is not TLS (set sslmode=require or stricter)"
        } else if !offers(SCRAM_SHA_256_PLUS) {
            "the server does not offer SCRAM-SHA-256-PLUS"
        } else {
            "the server certificate's signature algorithm defines no tls-server-end-point hash"
        };
        return Err(ReplicationError::Auth(format!(
            "channel_binding=require, but SCRAM cannot be bound to the connection: {why}"
        )));
    }
    if !offers(mechanism) {
        return Err(ReplicationError::Auth(format!(
            "the server offers SASL mechanisms {mechanisms:?}; outbox-relay supports \
             SCRAM-SHA-256 and SCRAM-SHA-256-PLUS"
        )));
    }
    let password = password(cfg, "SCRAM-SHA-256")?;
    let mut scram = ScramSha256::new(password.as_bytes(), binding);
    frontend::sasl_initial_response(mechanism, scram.message(), conn.out())?;
    conn.flush().await?;

    let server_first = match conn.recv().await? {
        BackendMessage::Authentication(AuthRequest::SaslContinue(data)) => data,
        other => return Err(other.unexpected("the SCRAM exchange")),
    };
    scram.update(&server_first).map_err(|e| {
        ReplicationError::Auth(format!("invalid SCRAM challenge from the server: {e}"))
    })?;
    frontend::sasl_response(scram.message(), conn.out())?;
    conn.flush().await?;

    let server_final = match conn.recv().await? {
        BackendMessage::Authentication(AuthRequest::SaslFinal(data)) => data,
        other => return Err(other.unexpected("the SCRAM exchange")),
    };
    scram.finish(&server_final).map_err(|e| {
        ReplicationError::Auth(format!(
            "the server's SCRAM signature did not verify ({e}); it may not know the password"
        ))
    })?;
    Ok(mechanism)
}

fn password<'a>(cfg: &'a ConnectConfig, method: &str) -> Result<&'a str, ReplicationError> {
    cfg.password.as_deref().ok_or_else(|| {
        ReplicationError::Auth(format!(
            "the server asks for {method} authentication for user \"{}\" but no password is configured",
            cfg.user
        ))
    })
}

fn method_name(code: i32) -> String {
    match code {
        2 => "Kerberos V5".into(),
        6 => "SCM credential".into(),
        7 | 8 => "GSSAPI".into(),
        9 => "SSPI".into(),
        code => format!("an unknown method ({code})"),
    }
}

/// `server_version_num` if the server reported it, else derived from `server_version`.
fn server_version_num(parameters: &HashMap<String, String>) -> Result<u32, ReplicationError> {
    if let Some(num) = parameters.get("server_version_num") {
        if let Ok(num) = num.trim().parse() {
            return Ok(num);
        }
    }
    let version = parameters.get("server_version").ok_or_else(|| {
        ReplicationError::Protocol("server did not report server_version at startup".into())
    })?;
    parse_server_version(version).ok_or_else(|| {
        ReplicationError::Protocol(format!(
            "cannot read PostgreSQL version from server_version {version:?}"
        ))
    })
}

/// `"15.4 (Debian 15.4-1.pgdg120+1)"` → 150004, `"17.11"` → 170011,
/// `"16beta1"` → 160000, `"9.6.24"` → 90624.
pub(crate) fn parse_server_version(version: &str) -> Option<u32> {
    let numeric: &str = {
        let s = version.trim_start();
        let end = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        &s[..end]
    };
    let mut parts = numeric.split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let mut next = || -> Option<u32> {
        match parts.next() {
            None | Some("") => Some(0),
            Some(p) => p.parse().ok(),
        }
    };
    let minor = next()?;
    if major >= 10 {
        major.checked_mul(10_000)?.checked_add(minor)
    } else {
        let patch = next()?;
        Some(major * 10_000 + minor * 100 + patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_version_strings() {
        for (text, num) in [
            ("15.4 (Debian 15.4-1.pgdg120+1)", 150004),
            ("17.11", 170011),
            ("14.0", 140000),
            ("16beta1", 160000),
            ("18devel", 180000),
            ("10.23", 100023),
            ("9.6.24", 90624),
            ("13.2 on x86_64", 130002),
        ] {
            assert_eq!(parse_server_version(text), Some(num), "{text}");
        }
        for bad in ["", "abc", "x15.4", ".5", "99999999999.1"] {
            assert_eq!(parse_server_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn server_version_num_parameter_wins() {
        let mut p = HashMap::new();
        p.insert("server_version".to_string(), "15.4".to_string());
        assert_eq!(server_version_num(&p).unwrap(), 150004);
        p.insert("server_version_num".to_string(), "150007".to_string());
        assert_eq!(server_version_num(&p).unwrap(), 150007);
        assert!(server_version_num(&HashMap::new()).is_err());
    }
}
