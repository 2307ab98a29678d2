//! Parsing of backend (server → client) message bodies.
//!
//! Done here rather than by `postgres-protocol`: its parser exposes error
//! fields, data rows and SASL mechanisms only through `fallible-iterator` (a
//! dependency we would add for that alone) and rejects tags it does not know
//! (`W` CopyBothResponse, `v`). The dozen bodies a walsender connection needs
//! are small, and owning them keeps one rule everywhere: bad bytes from the
//! network are a [`ReplicationError::Protocol`], never a panic.

use bytes::{Buf, Bytes};

use super::{ReplicationError, ServerError};

/// One message from the server, as far as this client cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackendMessage {
    /// `R`.
    Authentication(AuthRequest),
    /// `K`; the cancel key is not kept (we never send CancelRequest).
    BackendKeyData { process_id: i32 },
    /// `S`.
    ParameterStatus { name: String, value: String },
    /// `Z`; `status` is `I`, `T` or `E`.
    ReadyForQuery { status: u8 },
    /// `T`; only the column count is kept.
    RowDescription { columns: u16 },
    /// `D`; `None` is SQL NULL.
    DataRow(Vec<Option<Bytes>>),
    /// `C`.
    CommandComplete { tag: String },
    /// `I`.
    EmptyQueryResponse,
    /// `E`.
    ErrorResponse(ServerError),
    /// `N`; same fields as an error.
    NoticeResponse(ServerError),
    /// `A` (LISTEN/NOTIFY; not expected on a walsender connection).
    NotificationResponse { channel: String },
    /// `v`: the server speaks an older minor protocol version.
    NegotiateProtocolVersion { newest_minor: i32 },
    /// `G`.
    CopyInResponse,
    /// `H`.
    CopyOutResponse,
    /// `W`.
    CopyBothResponse,
    /// `d`: the payload, a zero-copy slice of the received frame.
    CopyData(Bytes),
    /// `c`.
    CopyDone,
    /// A tag this client does not handle; the caller reports it in context.
    Other { tag: u8 },
}

impl BackendMessage {
    /// The protocol's name for this message, for errors and logs.
    pub(crate) fn name(&self) -> String {
        let name = match self {
            BackendMessage::Authentication(_) => "Authentication",
            BackendMessage::BackendKeyData { .. } => "BackendKeyData",
            BackendMessage::ParameterStatus { .. } => "ParameterStatus",
            BackendMessage::ReadyForQuery { .. } => "ReadyForQuery",
            BackendMessage::RowDescription { .. } => "RowDescription",
            BackendMessage::DataRow(_) => "DataRow",
            BackendMessage::CommandComplete { .. } => "CommandComplete",
            BackendMessage::EmptyQueryResponse => "EmptyQueryResponse",
            BackendMessage::ErrorResponse(_) => "ErrorResponse",
            BackendMessage::NoticeResponse(_) => "NoticeResponse",
            BackendMessage::NotificationResponse { .. } => "NotificationResponse",
            BackendMessage::NegotiateProtocolVersion { .. } => "NegotiateProtocolVersion",
            BackendMessage::CopyInResponse => "CopyInResponse",
            BackendMessage::CopyOutResponse => "CopyOutResponse",
            BackendMessage::CopyBothResponse => "CopyBothResponse",
            BackendMessage::CopyData(_) => "CopyData",
            BackendMessage::CopyDone => "CopyDone",
            BackendMessage::Other { tag } => return format!("unknown ('{}')", tag.escape_ascii()),
        };
        name.to_string()
    }

    /// A protocol violation: this message cannot come now. An ErrorResponse
    /// is passed through as the server's error.
    pub(crate) fn unexpected(self, during: &str) -> ReplicationError {
        match self {
            BackendMessage::ErrorResponse(e) => ReplicationError::Server(e),
            other => ReplicationError::Protocol(format!(
                "the server sent an unexpected {} message during {during}",
                other.name()
            )),
        }
    }
}

/// The body of an `R` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthRequest {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// Kerberos (2), SCM (6), GSS (7, 8), SSPI (9), or something newer.
    Unsupported(i32),
}

/// Parse the body of one message whose header has already been removed.
pub(crate) fn parse_body(tag: u8, body: Bytes) -> Result<BackendMessage, ReplicationError> {
    let mut r = Reader { tag, body };
    let message = match tag {
        b'R' => BackendMessage::Authentication(parse_auth(&mut r)?),
        b'K' => {
            let process_id = r.i32()?;
            // The secret key (4 bytes in protocol 3.0) is not needed.
            r.rest();
            BackendMessage::BackendKeyData { process_id }
        }
        b'S' => BackendMessage::ParameterStatus {
            name: r.string()?,
            value: r.string()?,
        },
        b'Z' => BackendMessage::ReadyForQuery { status: r.u8()? },
        b'T' => {
            let columns = r.u16()?;
            // Field descriptions are not needed: simple_query returns text.
            r.rest();
            BackendMessage::RowDescription { columns }
        }
        b'D' => {
            let count = r.u16()?;
            let mut values = Vec::with_capacity(usize::from(count).min(r.body.len() / 4));
            for _ in 0..count {
                let len = r.i32()?;
                values.push(match len {
                    -1 => None,
                    len if len >= 0 => Some(r.bytes(len as usize)?),
                    len => return Err(r.malformed(&format!("column length {len}"))),
                });
            }
            BackendMessage::DataRow(values)
        }
        b'C' => BackendMessage::CommandComplete { tag: r.string()? },
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::ErrorResponse(parse_fields(&mut r)?),
        b'N' => BackendMessage::NoticeResponse(parse_fields(&mut r)?),
        b'A' => {
            let _process_id = r.i32()?;
            let channel = r.string()?;
            let _payload = r.cstr()?;
            BackendMessage::NotificationResponse { channel }
        }
        b'v' => {
            let newest_minor = r.i32()?;
            // The unrecognized `_pq_` options follow; we send none.
            r.rest();
            BackendMessage::NegotiateProtocolVersion { newest_minor }
        }
        // Copy responses: Int8 format, Int16 ncols, Int16 per column. The
        // replication protocol fixes them (binary, 0 columns); not needed.
        b'G' | b'H' | b'W' => {
            r.rest();
            match tag {
                b'G' => BackendMessage::CopyInResponse,
                b'H' => BackendMessage::CopyOutResponse,
                _ => BackendMessage::CopyBothResponse,
            }
        }
        b'd' => BackendMessage::CopyData(r.rest()),
        b'c' => BackendMessage::CopyDone,
        _ => {
            r.rest();
            BackendMessage::Other { tag }
        }
    };
    r.finish()?;
    Ok(message)
}

fn parse_auth(r: &mut Reader) -> Result<AuthRequest, ReplicationError> {
    Ok(match r.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::CleartextPassword,
        5 => {
            let salt = r.bytes(4)?;
            AuthRequest::Md5Password {
                salt: [salt[0], salt[1], salt[2], salt[3]],
            }
        }
        10 => {
            // A list of NUL-terminated names, ended by an empty one.
            let mut mechanisms = Vec::new();
            loop {
                let name = r.string()?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(name);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(r.rest()),
        12 => AuthRequest::SaslFinal(r.rest()),
        code => {
            r.rest();
            AuthRequest::Unsupported(code)
        }
    })
}

/// Fields of an ErrorResponse / NoticeResponse: `Byte1 code, String value`
/// pairs ended by a zero byte. Text is decoded leniently: an error message
/// must never be lost to an encoding problem.
fn parse_fields(r: &mut Reader) -> Result<ServerError, ReplicationError> {
    let mut localized_severity = None;
    let mut severity = None;
    let mut error = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    loop {
        let field = r.u8()?;
        if field == 0 {
            break;
        }
        let value = String::from_utf8_lossy(&r.cstr()?).into_owned();
        match field {
            b'S' => localized_severity = Some(value),
            // `V` is never translated (PG 9.6+): prefer it.
            b'V' => severity = Some(value),
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    error.severity = severity.or(localized_severity).unwrap_or_default();
    Ok(error)
}

/// A bounds-checked cursor over one message body.
struct Reader {
    tag: u8,
    body: Bytes,
}

impl Reader {
    fn malformed(&self, what: &str) -> ReplicationError {
        ReplicationError::Protocol(format!(
            "malformed '{}' message from the server: {what}",
            self.tag.escape_ascii()
        ))
    }

    fn need(&self, n: usize, what: &str) -> Result<(), ReplicationError> {
        if self.body.len() < n {
            return Err(
                self.malformed(&format!("{what} needs {n} bytes, {} left", self.body.len()))
            );
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, ReplicationError> {
        self.need(1, "Byte1")?;
        Ok(self.body.get_u8())
    }

    fn u16(&mut self) -> Result<u16, ReplicationError> {
        self.need(2, "Int16")?;
        Ok(self.body.get_u16())
    }

    fn i32(&mut self) -> Result<i32, ReplicationError> {
        self.need(4, "Int32")?;
        Ok(self.body.get_i32())
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, ReplicationError> {
        self.need(n, "value")?;
        Ok(self.body.split_to(n))
    }

    /// A NUL-terminated string, without the NUL.
    fn cstr(&mut self) -> Result<Bytes, ReplicationError> {
        let end = self
            .body
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.malformed("string without terminating NUL"))?;
        let s = self.body.split_to(end);
        self.body.advance(1);
        Ok(s)
    }

    fn string(&mut self) -> Result<String, ReplicationError> {
        let raw = self.cstr()?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.malformed("string is not UTF-8"))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.body)
    }

    fn finish(self) -> Result<(), ReplicationError> {
        if !self.body.is_empty() {
            return Err(self.malformed(&format!("{} unexpected trailing bytes", self.body.len())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn one(tag: u8, body: &[u8]) -> Result<BackendMessage, ReplicationError> {
        parse_body(tag, Bytes::copy_from_slice(body))
    }

    #[test]
    fn parses_startup_messages() {
        assert_eq!(
            one(b'R', &0i32.to_be_bytes()).unwrap(),
            BackendMessage::Authentication(AuthRequest::Ok)
        );
        let mut md5 = 5i32.to_be_bytes().to_vec();
        md5.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            one(b'R', &md5).unwrap(),
            BackendMessage::Authentication(AuthRequest::Md5Password { salt: [1, 2, 3, 4] })
        );
        let mut sasl = 10i32.to_be_bytes().to_vec();
        sasl.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            one(b'R', &sasl).unwrap(),
            BackendMessage::Authentication(AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            })
        );
        assert_eq!(
            one(b'R', &7i32.to_be_bytes()).unwrap(),
            BackendMessage::Authentication(AuthRequest::Unsupported(7))
        );
        assert_eq!(
            one(b'S', b"server_version\x0015.4 (Debian 15.4-1)\0").unwrap(),
            BackendMessage::ParameterStatus {
                name: "server_version".into(),
                value: "15.4 (Debian 15.4-1)".into()
            }
        );
        let mut key = 4242i32.to_be_bytes().to_vec();
        key.extend_from_slice(&7i32.to_be_bytes());
        assert_eq!(
            one(b'K', &key).unwrap(),
            BackendMessage::BackendKeyData { process_id: 4242 }
        );
        assert_eq!(
            one(b'Z', b"I").unwrap(),
            BackendMessage::ReadyForQuery { status: b'I' }
        );
    }

    #[test]
    fn parses_error_fields() {
        let body = b"SERREUR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0Dsome detail\0Hsome hint\0Fslot.c\0\0";
        let BackendMessage::ErrorResponse(e) = one(b'E', body).unwrap() else {
            panic!("not an error");
        };
        assert_eq!(e.severity, "ERROR", "non-localized severity wins");
        assert_eq!(e.code, "55006");
        assert_eq!(e.message, "replication slot \"s\" is active for PID 7");
        assert_eq!(e.detail.as_deref(), Some("some detail"));
        assert_eq!(e.hint.as_deref(), Some("some hint"));

        let BackendMessage::NoticeResponse(n) =
            one(b'N', b"SNOTICE\0C00000\0Mhello \xff\0\0").unwrap()
        else {
            panic!("not a notice");
        };
        assert_eq!(n.severity, "NOTICE");
        assert_eq!(
            n.message, "hello \u{fffd}",
            "invalid UTF-8 is replaced, not fatal"
        );
        assert_eq!(n.detail, None);
    }

    #[test]
    fn parses_data_rows_and_copy_messages() {
        let mut row = BytesMut::new();
        row.put_u16(3);
        row.put_i32(2);
        row.put_slice(b"ab");
        row.put_i32(-1);
        row.put_i32(0);
        assert_eq!(
            one(b'D', &row).unwrap(),
            BackendMessage::DataRow(vec![
                Some(Bytes::from_static(b"ab")),
                None,
                Some(Bytes::new())
            ])
        );
        assert_eq!(
            one(b'W', &[0, 0, 0]).unwrap(),
            BackendMessage::CopyBothResponse
        );
        assert_eq!(one(b'c', &[]).unwrap(), BackendMessage::CopyDone);
        assert_eq!(
            one(b'd', b"kpayload").unwrap(),
            BackendMessage::CopyData(Bytes::from_static(b"kpayload"))
        );
        assert_eq!(
            one(b'C', b"IDENTIFY_SYSTEM\0").unwrap(),
            BackendMessage::CommandComplete {
                tag: "IDENTIFY_SYSTEM".into()
            }
        );
        assert_eq!(
            one(b'?', b"xyz").unwrap(),
            BackendMessage::Other { tag: b'?' }
        );
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let cases: Vec<(u8, &[u8])> = vec![
            (b'Z', b""),                             // missing status
            (b'Z', b"II"),                           // trailing byte
            (b'S', b"name-without-nul"),             // unterminated string
            (b'S', b"a\0"),                          // missing value
            (b'S', b"\xff\0b\0"),                    // not UTF-8
            (b'E', b"Mno terminator"),               // unterminated field
            (b'D', &[0, 1, 0, 0, 0, 9, b'x']),       // value longer than body
            (b'D', &[0, 1, 0xff, 0xff, 0xff, 0xfe]), // length -2
            (b'R', &[0, 0, 0, 5, 1, 2]),             // short md5 salt
            (b'R', &[0, 0, 0, 10, b'x']),            // unterminated mechanism list
            (b'R', &[0, 0]),                         // short auth code
            (b'K', &[0, 0]),                         // short key data
        ];
        for (tag, body) in cases {
            let err = one(tag, body).unwrap_err();
            assert!(
                matches!(err, ReplicationError::Protocol(_)),
                "{body:?}: {err:?}"
            );
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic() {
        // xorshift: deterministic pseudo-random input without a dependency.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = b"RKSZTDCIENAvGHWdc?";
        for _ in 0..50_000 {
            let len = (next() % 40) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 {
                // Bias towards plausible bodies: small numbers and NULs.
                for b in body.iter_mut().filter(|_| next() % 3 == 0) {
                    *b = 0;
                }
            }
            let tag = tags[(next() % tags.len() as u64) as usize];
            let _ = parse_body(tag, Bytes::from(body));
        }
    }
}
