//! `postgres.url`: parsing (URL or `key=value` form, through `tokio_postgres`), the
//! one server the relay talks to, its TLS settings, and redaction for logs.
//!
//! tokio-postgres knows `sslmode` only up to `require` and none of `sslrootcert`,
//! `sslcert`, `sslkey`; those are taken out of the text here ([`split_ssl_params`])
//! with libpq's meaning, and the rest goes to tokio-postgres.

use std::path::PathBuf;

use tokio_postgres::config::{ChannelBinding, Host, SslMode as PgSslMode, SslNegotiation};

use super::Problem;
use crate::replication::{ChannelBindingMode, RootCert, SslMode, TlsOptions};

const URL_FIX: &str = "write a URL like postgres://USER:PASSWORD@HOST:5432/DBNAME, or key=value \
                       pairs like 'host=HOST port=5432 user=USER dbname=DBNAME'";

/// The libpq TLS parameters tokio-postgres does not take, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SslParams {
    pub mode: Option<String>,
    pub root_cert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    /// `sslpassword`: only noted, to refuse it with a reason.
    pub key_password: bool,
    /// `target_session_attrs`, also taken out: libpq knows more values than
    /// tokio-postgres, and the relay chooses the server itself (see
    /// [`crate::failover`]).
    pub session_attrs: Option<String>,
}

/// `postgres.url`, parsed: tokio-postgres' view (with `sslmode` mapped onto its
/// three modes) and the TLS parameters.
/// `Debug` is safe: tokio-postgres redacts the password in its own.
#[derive(Clone, Debug)]
pub(crate) struct Conninfo {
    pub pg: tokio_postgres::Config,
    pub ssl: SslParams,
}

/// Parses `postgres.url` and applies the password given apart from it (which wins).
pub(crate) fn parse(url: &str, password: Option<&str>) -> Result<Conninfo, Problem> {
    let (rest, ssl) = split_ssl_params(url).ok_or_else(|| {
        Problem::new(
            "postgres.url is not a valid connection string (unbalanced quotes or a missing '=')",
            URL_FIX,
        )
    })?;
    let mut pg: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| {
        // The error's own Display is only "invalid connection string"; the reason is in
        // its source. Neither contains the password.
        let reason = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        Problem::new(
            format!("postgres.url is not a valid connection string ({reason})"),
            URL_FIX,
        )
    })?;
    if let Some(pw) = password {
        pg.password(pw);
    }
    // tokio-postgres negotiates; the verification is ours (see crate::sql).
    pg.ssl_mode(match ssl_mode(&ssl) {
        Ok(SslMode::Disable) => PgSslMode::Disable,
        Ok(SslMode::Prefer) | Err(_) => PgSslMode::Prefer,
        Ok(_) => PgSslMode::Require,
    });
    Ok(Conninfo { pg, ssl })
}

/// The effective sslmode: as written, else `verify-full` with
/// `sslrootcert=system` (libpq 16), else libpq's default `prefer`.
fn ssl_mode(ssl: &SslParams) -> Result<SslMode, String> {
    match ssl.mode.as_deref() {
        None if ssl.root_cert.as_deref() == Some("system") => Ok(SslMode::VerifyFull),
        None => Ok(SslMode::Prefer),
        Some(m) => SslMode::parse(m).ok_or_else(|| m.to_string()),
    }
}

/// Takes `sslmode`, `sslrootcert`, `sslcert`, `sslkey` and `sslpassword` out of a
/// URL's query or a `key=value` string; `None` if the text cannot be tokenized.
pub(crate) fn split_ssl_params(url: &str) -> Option<(String, SslParams)> {
    let mut ssl = SslParams::default();
    let mut take = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => ssl.mode = Some(value),
            "sslrootcert" => ssl.root_cert = Some(value),
            "sslcert" => ssl.cert = Some(value),
            "sslkey" => ssl.key = Some(value),
            "sslpassword" => ssl.key_password = true,
            "target_session_attrs" => ssl.session_attrs = Some(value),
            _ => return false,
        }
        true
    };
    let trimmed = url.trim_start();
    let is_url = ["postgres://", "postgresql://"]
        .iter()
        .any(|p| trimmed.starts_with(p));
    if is_url {
        let Some((base, query)) = url.split_once('?') else {
            return Some((url.to_string(), ssl));
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
                    return true; // tokio-postgres reports it
                };
                !take(&k, v)
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Some((rest, ssl))
    } else {
        let pairs = key_value_pairs(url)?;
        let kept: Vec<&str> = pairs
            .iter()
            .filter(|p| !take(p.key, p.value.clone()))
            .map(|p| &url[p.start..p.end])
            .collect();
        Some((kept.join(" "), ssl))
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The server, role and database of the replication connection; the SQL connection
/// goes to the same place.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// The first host (the one when there is only one).
    pub host: String,
    pub port: u16,
    /// Every host of the URL, in the order libpq tries them.
    pub targets: Vec<Target>,
    pub session_attrs: SessionAttrs,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub tls: TlsOptions,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("targets", &self.targets)
            .field("session_attrs", &self.session_attrs)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Everything the replication connection cannot use, all at once.
pub(crate) fn endpoint(ci: &Conninfo) -> Result<Endpoint, Vec<Problem>> {
    let pg = &ci.pg;
    let mut problems = Vec::new();
    let hosts = pg.get_hosts();
    let unix: Vec<String> = hosts
        .iter()
        .filter_map(|h| match h {
            Host::Unix(p) => Some(p.display().to_string()),
            Host::Tcp(_) => None,
        })
        .collect();
    if !unix.is_empty() {
        problems.push(Problem::new(
            format!(
                "postgres.url connects through a Unix-domain socket ({})",
                unix.join(", ")
            ),
            "use a TCP host, e.g. host=127.0.0.1 or postgres://USER@localhost:5432/DBNAME \
             (the replication connection speaks TCP only for now)",
        ));
    } else if hosts.is_empty() && pg.get_hostaddrs().is_empty() {
        problems.push(Problem::new(
            "postgres.url names no host",
            "use a TCP host, e.g. postgres://USER@127.0.0.1:5432/DBNAME",
        ));
    }
    let targets = targets(pg, &mut problems);
    let session_attrs = match ci.ssl.session_attrs.as_deref() {
        None => SessionAttrs::Any,
        Some(v) => match SessionAttrs::parse(v) {
            Some(a) if a.for_the_primary() => a,
            Some(a) => {
                problems.push(Problem::new(
                    format!("postgres.url has target_session_attrs={a}"),
                    "the relay streams from the primary (it creates its slot and records its \
                     progress there): use target_session_attrs=read-write or primary, or \
                     leave it out",
                ));
                SessionAttrs::Any
            }
            None => {
                problems.push(Problem::new(
                    format!("postgres.url has an unknown target_session_attrs {v:?}"),
                    "use read-write or primary (or any, the default)",
                ));
                SessionAttrs::Any
            }
        },
    };
    let tls = tls_options(ci, &mut problems);
    let user = pg.get_user().filter(|u| !u.is_empty());
    if user.is_none() {
        problems.push(Problem::new(
            "postgres.url names no user",
            "add one: postgres://USER@HOST:5432/DBNAME or user=USER",
        ));
    }
    let password = match pg.get_password().map(|p| String::from_utf8(p.to_vec())) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(_)) => {
            problems.push(Problem::new(
                "the PostgreSQL password is not valid UTF-8",
                "use a UTF-8 password",
            ));
            None
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let first = targets
        .first()
        .cloned()
        .expect("a URL without a TCP host was rejected above");
    let tls = TlsOptions {
        server_name: first.server_name.clone(),
        ..tls.expect("TLS problems were reported above")
    };
    let user = user.expect("a missing user was rejected above").to_string();
    Ok(Endpoint {
        host: first.host,
        port: first.port,
        targets,
        session_attrs,
        // libpq's default: the database named like the user.
        dbname: pg
            .get_dbname()
            .filter(|d| !d.is_empty())
            .unwrap_or(&user)
            .to_string(),
        user,
        password,
        tls,
    })
}

/// One server of a (multi-host) URL: where to connect and the name its
/// certificate is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub host: String,
    pub port: u16,
    pub server_name: String,
}

/// libpq's `target_session_attrs`: which of the listed servers to settle on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionAttrs {
    /// The first server that accepts the connection.
    #[default]
    Any,
    /// Not in recovery and `default_transaction_read_only = off`.
    ReadWrite,
    /// Not in recovery (hot standby).
    Primary,
    /// The opposites, accepted by the parser so the error can name them.
    ReadOnly,
    Standby,
    PreferStandby,
}

impl SessionAttrs {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "primary" => SessionAttrs::Primary,
            "read-only" => SessionAttrs::ReadOnly,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            _ => return None,
        })
    }

    /// Whether a relay may use it: the relay needs the primary.
    pub fn for_the_primary(self) -> bool {
        matches!(
            self,
            SessionAttrs::Any | SessionAttrs::ReadWrite | SessionAttrs::Primary
        )
    }

    /// Whether a server with these properties is acceptable (libpq's rules;
    /// `read_only` is `default_transaction_read_only`).
    pub fn accepts(self, in_hot_standby: bool, read_only: bool) -> bool {
        match self {
            SessionAttrs::Any | SessionAttrs::PreferStandby => true,
            SessionAttrs::ReadWrite => !in_hot_standby && !read_only,
            SessionAttrs::Primary => !in_hot_standby,
            SessionAttrs::ReadOnly => in_hot_standby || read_only,
            SessionAttrs::Standby => in_hot_standby,
        }
    }
}

impl std::fmt::Display for SessionAttrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::Primary => "primary",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        })
    }
}

/// The servers of the URL in order, pairing hosts, `hostaddr`s and ports as
/// libpq does (one port for all, or one per host).
fn targets(pg: &tokio_postgres::Config, problems: &mut Vec<Problem>) -> Vec<Target> {
    let hosts = pg.get_hosts();
    let addrs = pg.get_hostaddrs();
    let ports = pg.get_ports();
    let count = hosts.len().max(addrs.len());
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        problems.push(Problem::new(
            format!(
                "postgres.url lists {} hosts but {} hostaddrs",
                hosts.len(),
                addrs.len()
            ),
            "give one hostaddr per host, or leave hostaddr out",
        ));
        return Vec::new();
    }
    if ports.len() > 1 && ports.len() != count {
        problems.push(Problem::new(
            format!("postgres.url lists {count} hosts but {} ports", ports.len()),
            "give one port for all hosts, or one per host (host=h1,h2 port=5432,5433)",
        ));
        return Vec::new();
    }
    (0..count)
        .filter_map(|i| {
            let port = match ports.len() {
                0 => 5432,
                1 => ports[0],
                _ => ports[i],
            };
            // A `hostaddr` skips name resolution; libpq connects to it, so do we.
            // The certificate is still checked against `host` when there is one.
            let (host, server_name) = match (addrs.get(i), hosts.get(i)) {
                (Some(addr), Some(Host::Tcp(h))) => (addr.to_string(), h.clone()),
                (Some(addr), _) => (addr.to_string(), addr.to_string()),
                (None, Some(Host::Tcp(h))) => (h.clone(), h.clone()),
                (None, _) => return None, // Unix sockets are rejected by the caller
            };
            Some(Target {
                host,
                port,
                server_name,
            })
        })
        .collect()
}

/// `pg` reduced to the one server `target` (tokio-postgres would otherwise try
/// every host itself, and maybe reach another server than the relay chose).
pub(crate) fn single_host(pg: &tokio_postgres::Config, target: &Target) -> tokio_postgres::Config {
    let mut one = tokio_postgres::Config::new();
    one.host(&target.host).port(target.port);
    if let Some(u) = pg.get_user() {
        one.user(u);
    }
    if let Some(p) = pg.get_password() {
        one.password(p);
    }
    if let Some(d) = pg.get_dbname() {
        one.dbname(d);
    }
    if let Some(o) = pg.get_options() {
        one.options(o);
    }
    if let Some(a) = pg.get_application_name() {
        one.application_name(a);
    }
    if let Some(t) = pg.get_connect_timeout() {
        one.connect_timeout(*t);
    }
    if let Some(t) = pg.get_tcp_user_timeout() {
        one.tcp_user_timeout(*t);
    }
    one.ssl_mode(pg.get_ssl_mode())
        .ssl_negotiation(pg.get_ssl_negotiation())
        .channel_binding(pg.get_channel_binding())
        .keepalives(pg.get_keepalives())
        .keepalives_idle(pg.get_keepalives_idle());
    if let Some(i) = pg.get_keepalives_interval() {
        one.keepalives_interval(i);
    }
    if let Some(r) = pg.get_keepalives_retries() {
        one.keepalives_retries(r);
    }
    one
}

/// The TLS settings of the URL, checked; `None` after pushing what is wrong.
fn tls_options(ci: &Conninfo, problems: &mut Vec<Problem>) -> Option<TlsOptions> {
    let ssl = &ci.ssl;
    let before = problems.len();
    let mode = match ssl_mode(ssl) {
        Ok(m) => m,
        Err(bad) => {
            let fix = if bad == "allow" {
                "use sslmode=prefer (outbox-relay does not support allow)".to_string()
            } else {
                "use one of disable, prefer, require, verify-ca, verify-full".to_string()
            };
            problems.push(Problem::new(
                format!("postgres.url has an unknown sslmode {bad:?}"),
                fix,
            ));
            SslMode::Prefer
        }
    };
    let path = |v: &str| PathBuf::from(v);
    let root_cert = match ssl.root_cert.as_deref() {
        None | Some("") => None,
        Some("system") => Some(RootCert::System),
        Some(p) => Some(RootCert::File(path(p))),
    };
    if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        problems.push(Problem::new(
            format!("postgres.url has sslrootcert=system with sslmode={mode}"),
            "use sslmode=verify-full with the system's CAs (any certificate a public CA \
             signed would pass otherwise), or point sslrootcert at your own CA's file",
        ));
    }
    if mode >= SslMode::VerifyCa && root_cert.is_none() {
        problems.push(Problem::new(
            format!("postgres.url has sslmode={mode} but no sslrootcert"),
            "add sslrootcert=/path/to/ca.pem (the CA that signed the server certificate), or \
             sslrootcert=system for the system's trusted CAs",
        ));
    }
    let non_empty = |v: &Option<String>| v.as_deref().filter(|v| !v.is_empty()).map(path);
    let (client_cert, client_key) = (non_empty(&ssl.cert), non_empty(&ssl.key));
    if client_cert.is_some() != client_key.is_some() {
        problems.push(Problem::new(
            "postgres.url sets only one of sslcert and sslkey",
            "set both: sslcert=/path/client.crt&sslkey=/path/client.key",
        ));
    }
    if ssl.key_password {
        problems.push(Problem::new(
            "postgres.url sets sslpassword, but outbox-relay reads only unencrypted keys",
            "decrypt the key (openssl pkey -in enc.key -out client.key), keep it readable by \
             the relay only, and drop sslpassword",
        ));
    }
    if mode == SslMode::Disable && (root_cert.is_some() || client_cert.is_some()) {
        problems.push(Problem::new(
            "postgres.url sets certificates but sslmode=disable",
            "drop sslmode=disable (or the certificates)",
        ));
    }
    let direct = ci.pg.get_ssl_negotiation() == SslNegotiation::Direct;
    if direct && mode < SslMode::Require {
        problems.push(Problem::new(
            format!("postgres.url has sslnegotiation=direct with sslmode={mode}"),
            "direct TLS needs sslmode=require or stricter (libpq's rule)",
        ));
    }
    let channel_binding = match ci.pg.get_channel_binding() {
        ChannelBinding::Disable => ChannelBindingMode::Disable,
        ChannelBinding::Require => ChannelBindingMode::Require,
        _ => ChannelBindingMode::Prefer,
    };
    if channel_binding == ChannelBindingMode::Require && mode == SslMode::Disable {
        problems.push(Problem::new(
            "postgres.url has channel_binding=require with sslmode=disable",
            "channel binding needs TLS: use sslmode=require or stricter",
        ));
    }
    if problems.len() > before {
        return None;
    }
    // Files are read now, so a missing or broken one is reported at start.
    let opts = TlsOptions {
        mode,
        root_cert,
        client_cert,
        client_key,
        server_name: String::new(),
        direct,
        channel_binding,
    };
    if mode != SslMode::Disable {
        if let Err(e) = crate::replication::tls::client_config(&opts) {
            problems.push(Problem::new(
                format!("PostgreSQL TLS: {e}"),
                "fix the sslrootcert / sslcert / sslkey paths in postgres.url, or the files' \
                 permissions (the relay's user must read them)",
            ));
            return None;
        }
    }
    Some(opts)
}

/// The connection string with every password replaced by `<redacted>`, for `Debug`
/// and logs. Text it cannot tokenize is hidden whole rather than risked.
pub fn redact(url: &str) -> String {
    let trimmed = url.trim_start();
    let is_url = ["postgres://", "postgresql://"]
        .iter()
        .any(|p| trimmed.starts_with(p));
    let redacted = if is_url {
        redact_url(url)
    } else {
        redact_key_value(url)
    };
    redacted.unwrap_or_else(|| "<connection string redacted>".to_string())
}

const REDACTED: &str = "<redacted>";

fn redact_url(url: &str) -> Option<String> {
    let scheme_end = url.find("://")? + 3;
    let (scheme, rest) = url.split_at(scheme_end);
    let (before_query, query) = match rest.find('?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut out = String::from(scheme);
    // The userinfo ends at the last '@': an unencoded '@' in a password stays hidden.
    match before_query.rfind('@') {
        Some(at) => {
            let userinfo = &before_query[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&before_query[at..]);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k == "password" => format!("{k}={REDACTED}"),
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    Some(out)
}

/// `key = value` pairs: passwords replaced, everything else as written.
fn redact_key_value(text: &str) -> Option<String> {
    let pairs = key_value_pairs(text)?;
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for p in pairs.iter().filter(|p| p.key == "password") {
        out.push_str(&text[at..p.value_start]);
        out.push_str(REDACTED);
        at = p.end;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// One `key = value` of a conninfo string, with byte offsets into it.
struct Pair<'a> {
    key: &'a str,
    /// Unquoted and unescaped.
    value: String,
    /// Where the key starts, the value (as written) starts, and the value ends.
    start: usize,
    value_start: usize,
    end: usize,
}

/// Tokenizes `key = value` pairs, values optionally single-quoted with `\`
/// escapes (libpq rules). `None` when the text breaks those rules.
fn key_value_pairs(text: &str) -> Option<Vec<Pair<'_>>> {
    let mut pairs = Vec::new();
    let mut chars = text.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return Some(pairs);
        };
        let mut key_end = text.len();
        while let Some(&(i, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                key_end = i;
                break;
            }
            chars.next();
        }
        let key = &text[start..key_end];
        skip_ws(&mut chars);
        if chars.next()?.1 != '=' {
            return None;
        }
        skip_ws(&mut chars);
        let value_start = chars.peek().map_or(text.len(), |&(i, _)| i);
        let mut value = String::new();
        if chars.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match chars.next()?.1 {
                    '\\' => value.push(chars.next()?.1),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|&(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?.1);
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(text.len(), |&(i, _)| i);
        pairs.push(Pair {
            key,
            value,
            start,
            value_start,
            end,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(url: &str) -> Result<Endpoint, Vec<Problem>> {
        endpoint(&parse(url, None).unwrap())
    }

    #[test]
    fn redacts_url_passwords() {
        for (input, want) in [
            (
                "postgres://relay:s3cret@db:5432/app",
                "postgres://relay:<redacted>@db:5432/app",
            ),
            (
                "postgresql://relay:p@ss@db/app",
                "postgresql://relay:<redacted>@db/app",
            ),
            (
                "postgres://relay@db/app?sslmode=disable",
                "postgres://relay@db/app?sslmode=disable",
            ),
            (
                "postgres://db/app?user=relay&password=s3cret&application_name=x",
                "postgres://db/app?user=relay&password=<redacted>&application_name=x",
            ),
            ("postgres://db", "postgres://db"),
        ] {
            assert_eq!(redact(input), want);
        }
    }

    #[test]
    fn redacts_key_value_passwords() {
        for (input, want) in [
            (
                "host=db user=relay password=s3cret dbname=app",
                "host=db user=relay password=<redacted> dbname=app",
            ),
            (
                "host=db password = 'it\\'s a secret' dbname=app",
                "host=db password = <redacted> dbname=app",
            ),
            ("password=a\\ b host=db", "password=<redacted> host=db"),
            ("host=db", "host=db"),
        ] {
            assert_eq!(redact(input), want);
        }
        assert_eq!(
            redact("host=db password='unterminated"),
            "<connection string redacted>"
        );
        assert_eq!(redact("garbage password"), "<connection string redacted>");
    }

    #[test]
    fn endpoint_from_url_and_key_value() {
        let want = Endpoint {
            host: "db.example".into(),
            port: 6432,
            targets: vec![Target {
                host: "db.example".into(),
                port: 6432,
                server_name: "db.example".into(),
            }],
            session_attrs: SessionAttrs::Any,
            user: "relay".into(),
            password: Some("pw".into()),
            dbname: "app".into(),
            tls: TlsOptions {
                server_name: "db.example".into(),
                ..Default::default()
            },
        };
        assert!(ep("postgres://relay:pw@db.example:6432/app").unwrap() == want);
        assert!(ep("host=db.example port=6432 user=relay password=pw dbname=app").unwrap() == want);
        let e = ep("postgres://relay@db").unwrap();
        assert_eq!(
            (e.port, e.dbname.as_str(), e.password),
            (5432, "relay", None)
        );
        let e = ep("host=db.example hostaddr=10.1.2.3 user=relay").unwrap();
        assert_eq!(e.host, "10.1.2.3");
        assert_eq!(
            e.tls.server_name, "db.example",
            "the certificate names the host"
        );
        let e = ep("hostaddr=10.1.2.3 user=relay").unwrap();
        assert_eq!(e.tls.server_name, "10.1.2.3");
    }

    #[test]
    fn ssl_params_are_taken_out_for_tokio_postgres() {
        let (rest, ssl) = split_ssl_params(
            "postgres://relay@db/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://relay@db/app?application_name=x");
        assert_eq!(ssl.mode.as_deref(), Some("verify-full"));
        assert_eq!(ssl.root_cert.as_deref(), Some("/ca.pem"));
        let (rest, ssl) = split_ssl_params(
            "host=db sslcert='/a b.pem'  sslkey=/k.pem user=relay sslmode = require",
        )
        .unwrap();
        assert_eq!(rest, "host=db user=relay");
        assert_eq!(
            (ssl.cert.as_deref(), ssl.key.as_deref(), ssl.mode.as_deref()),
            (Some("/a b.pem"), Some("/k.pem"), Some("require"))
        );
        let (rest, _) = split_ssl_params("postgres://db/app?sslmode=disable").unwrap();
        assert_eq!(rest, "postgres://db/app");
    }

    #[test]
    fn ssl_modes_map_onto_tokio_postgres() {
        let mode = |url: &str| parse(url, None).unwrap().pg.get_ssl_mode();
        assert_eq!(mode("postgres://r@db/app"), PgSslMode::Prefer);
        assert_eq!(
            mode("postgres://r@db/app?sslmode=disable"),
            PgSslMode::Disable
        );
        assert_eq!(mode("host=db user=r sslmode=verify-ca"), PgSslMode::Require);
        let e = ep("postgres://r@db/app?sslmode=require&channel_binding=require").unwrap();
        assert_eq!(e.tls.mode, SslMode::Require);
        assert_eq!(e.tls.channel_binding, ChannelBindingMode::Require);
        let e = ep("postgres://r@db/app?sslnegotiation=direct&sslmode=require").unwrap();
        assert!(e.tls.direct);
    }

    #[test]
    fn tls_problems() {
        let text = |url: &str| -> String {
            ep(url)
                .unwrap_err()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(text("postgres://r@db/a?sslmode=verify-full").contains("no sslrootcert"));
        assert!(text("postgres://r@db/a?sslmode=allow").contains("use sslmode=prefer"));
        assert!(text("postgres://r@db/a?sslrootcert=system&sslmode=require")
            .contains("sslrootcert=system with sslmode=require"));
        assert!(text("postgres://r@db/a?sslcert=/c.pem").contains("only one of sslcert"));
        assert!(text("postgres://r@db/a?sslpassword=x").contains("unencrypted"));
        assert!(
            text("postgres://r@db/a?sslmode=disable&channel_binding=require")
                .contains("channel binding needs TLS")
        );
        assert!(text("postgres://r@db/a?sslnegotiation=direct").contains("sslmode=require"));
        let missing = text("postgres://r@db/a?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
        // sslrootcert=system alone means verify-full (libpq 16).
        assert_eq!(
            ssl_mode(&SslParams {
                root_cert: Some("system".into()),
                ..Default::default()
            }),
            Ok(SslMode::VerifyFull)
        );
    }

    #[test]
    fn password_override_wins() {
        let pg = parse("postgres://relay:old@db/app", Some("new")).unwrap();
        assert_eq!(endpoint(&pg).unwrap().password.as_deref(), Some("new"));
    }

    #[test]
    fn endpoint_problems_are_all_listed() {
        let problems = ep("host=/var/run/postgresql sslmode=bogus").unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(text[0].contains("Unix-domain socket") && text[0].contains("use a TCP host"));
        assert!(text[1].contains("unknown sslmode \"bogus\""));
        assert!(text[2].contains("no user"));
        // Several hosts are tried in order (libpq's multi-host URLs).
        assert_eq!(ep("postgres://relay@a,b/app").unwrap().targets.len(), 2);
        let problems = ep("host=a,b port=1,2,3 user=relay").unwrap_err();
        let text = problems[0].to_string();
        assert!(text.contains("2 hosts but 3 ports"), "{text}");
        assert!(ep("user=relay").unwrap_err()[0]
            .to_string()
            .contains("no host"));
    }

    #[test]
    fn parse_errors_do_not_echo_the_password() {
        let p = parse("postgres://relay:s3cret@db:notaport/app", None).unwrap_err();
        assert!(p.what.contains("not a valid connection string"), "{p}");
        assert!(!p.to_string().contains("s3cret"), "{p}");
    }
}
