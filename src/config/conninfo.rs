//! `postgres.url`: parsing (URL or `key=value` form, through `tokio_postgres`), the
//! one server the relay talks to, and redaction for logs.

use tokio_postgres::config::{ChannelBinding, Host, SslMode};

use super::Problem;

const URL_FIX: &str = "write a URL like postgres://USER:PASSWORD@HOST:5432/DBNAME, or key=value \
                       pairs like 'host=HOST port=5432 user=USER dbname=DBNAME'";

/// Parses `postgres.url` and applies the password given apart from it (which wins).
pub(crate) fn parse(url: &str, password: Option<&str>) -> Result<tokio_postgres::Config, Problem> {
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
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
    Ok(pg)
}

/// The server, role and database of the replication connection; the SQL connection
/// goes to the same place.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .finish()
    }
}

/// Everything the replication connection cannot use, all at once.
pub(crate) fn endpoint(pg: &tokio_postgres::Config) -> Result<Endpoint, Vec<Problem>> {
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
    let count = hosts.len().max(pg.get_hostaddrs().len());
    if count > 1 || pg.get_ports().len() > 1 {
        problems.push(Problem::new(
            format!(
                "postgres.url lists {} hosts or ports",
                count.max(pg.get_ports().len())
            ),
            "list only the primary: the relay's checks and its replication connection must \
             reach the same server",
        ));
    }
    if pg.get_ssl_mode() == SslMode::Require {
        problems.push(Problem::new(
            "postgres.url requires TLS (sslmode=require), which the replication connection \
             does not support yet",
            "use sslmode=prefer or sslmode=disable on a trusted network",
        ));
    }
    if pg.get_channel_binding() == ChannelBinding::Require {
        problems.push(Problem::new(
            "postgres.url requires channel binding (channel_binding=require), which needs TLS",
            "use channel_binding=prefer",
        ));
    }
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
    // A `hostaddr` skips name resolution; libpq connects to it, so do we.
    let host = match (pg.get_hostaddrs().first(), hosts.first()) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(Host::Tcp(h))) => h.clone(),
        (None, _) => unreachable!("no host and Unix hosts were rejected above"),
    };
    let user = user.expect("a missing user was rejected above").to_string();
    Ok(Endpoint {
        host,
        port: pg.get_ports().first().copied().unwrap_or(5432),
        // libpq's default: the database named like the user.
        dbname: pg
            .get_dbname()
            .filter(|d| !d.is_empty())
            .unwrap_or(&user)
            .to_string(),
        user,
        password,
    })
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

/// `key = value` pairs, values optionally single-quoted with `\` escapes (libpq rules).
fn redact_key_value(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let copy_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>, out: &mut String| {
        while let Some(&(_, c)) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
    };
    loop {
        copy_ws(&mut chars, &mut out);
        let Some(&(key_start, _)) = chars.peek() else {
            return Some(out);
        };
        let mut key_end = text.len();
        while let Some(&(i, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                key_end = i;
                break;
            }
            chars.next();
        }
        let key = &text[key_start..key_end];
        out.push_str(key);
        copy_ws(&mut chars, &mut out);
        if chars.next()?.1 != '=' {
            return None;
        }
        out.push('=');
        copy_ws(&mut chars, &mut out);
        let mut value = String::new();
        if chars.peek().map(|&(_, c)| c) == Some('\'') {
            value.push('\'');
            chars.next();
            loop {
                let (_, c) = chars.next()?;
                value.push(c);
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
                if c == '\\' {
                    value.push(chars.next()?.1);
                }
            }
        }
        out.push_str(if key == "password" { REDACTED } else { &value });
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
            user: "relay".into(),
            password: Some("pw".into()),
            dbname: "app".into(),
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
    }

    #[test]
    fn password_override_wins() {
        let pg = parse("postgres://relay:old@db/app", Some("new")).unwrap();
        assert_eq!(endpoint(&pg).unwrap().password.as_deref(), Some("new"));
    }

    #[test]
    fn endpoint_problems_are_all_listed() {
        let problems = ep("host=/var/run/postgresql sslmode=require").unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(text[0].contains("Unix-domain socket") && text[0].contains("use a TCP host"));
        assert!(text[1].contains("sslmode=require"));
        assert!(text[2].contains("no user"));
        let problems = ep("postgres://relay@a,b/app").unwrap_err();
        assert!(problems[0].to_string().contains("2 hosts"));
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
