//! pgoutput decoder: bytes of one XLogData payload in, one [`Message`] out.
//!
//! Pure: no IO, no clocks, no panics on arbitrary bytes. Field slices borrow
//! from the frame's [`Bytes`] (reference-counted, no copy).
//!
//! Reference: PostgreSQL docs, "Logical Replication Message Formats".

use bytes::Bytes;

use crate::lsn::Lsn;

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(PrepareLike),
    CommitPrepared(PrepareLike),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(PrepareLike),
}

/// `B`: a transaction starts. `final_lsn` is the LSN of its commit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

/// `C`: a transaction ends. `end_lsn` is the acknowledgement point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Present inside a stream block (protocol 2+).
    pub xid: Option<u32>,
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// 1 = part of the key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub xid: Option<u32>,
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub tuple: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// `K` (key columns) or `O` (old tuple), when sent.
    pub old: Option<(u8, TupleData)>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// `K` or `O`.
    pub kind: u8,
    pub old: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    /// 1 = CASCADE, 2 = RESTART IDENTITY.
    pub options: u8,
    pub relation_oids: Vec<u32>,
}

/// `M`: `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub xid: Option<u32>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    pub first_segment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
    /// Only with `streaming = parallel` (protocol 4).
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: u32,
    pub gid: String,
}

/// `P` Prepare, `K` Commit Prepared, `p` Stream Prepare share one layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareLike {
    pub flags: u8,
    pub lsn: Lsn,
    pub end_lsn: Lsn,
    pub time: i64,
    pub xid: u32,
    pub gid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: i64,
    pub rollback_time: i64,
    pub xid: u32,
    pub gid: String,
}

/// The columns of one row, in the order of the latest Relation message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    pub columns: Vec<Column>,
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// `n`
    Null,
    /// `u`: unchanged TOASTed value (never in an INSERT).
    UnchangedToast,
    /// `t`: the value in PostgreSQL's text output format.
    Text(Bytes),
    /// `b`: binary format (only with the `binary` option).
    Binary(Bytes),
}

/// Why a payload could not be decoded. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error(
        "pgoutput message {tag:?} is truncated: needed {needed} more bytes at offset {offset}"
    )]
    Truncated {
        tag: char,
        offset: usize,
        needed: usize,
    },
    #[error("unknown pgoutput message tag 0x{0:02x}")]
    UnknownTag(u8),
    #[error("pgoutput message {tag:?} is malformed: {reason}")]
    Malformed { tag: char, reason: String },
    #[error("pgoutput message {tag:?} has {extra} unexpected trailing bytes")]
    TrailingBytes { tag: char, extra: usize },
}

/// Decoder state: whether we are inside a stream block (protocol 2+), where
/// every data message carries its xid right after the tag.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the last message decoded opened a stream block (Stream Start)
    /// that no Stream Stop has closed yet.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decode one pgoutput message (the payload of one XLogData frame).
    ///
    /// The state changes only when a message decodes: a Stream Start that
    /// fails to decode does not open a stream block. Use one `Decoder` per
    /// replication connection; a new connection starts outside any block.
    pub fn decode(&mut self, buf: Bytes) -> Result<Message, DecodeError> {
        let Some(&tag) = buf.first() else {
            return Err(DecodeError::Empty);
        };
        let mut r = Reader { buf, pos: 1, tag };
        // pgoutput writes transaction boundaries only outside stream blocks
        // (its stream callbacks assert it). One inside means a Stream Stop was
        // lost, and the xid prefix of later data messages would be misread.
        match (self.in_stream, tag) {
            (true, b'B' | b'C' | b'S' | b'c' | b'A' | b'b' | b'P' | b'K' | b'r' | b'p') => {
                return Err(r.malformed("transaction boundary inside a stream block".into()));
            }
            (false, b'E') => {
                return Err(r.malformed("stream stop outside a stream block".into()));
            }
            _ => {}
        }
        let message = match tag {
            b'B' => Message::Begin(Begin {
                final_lsn: r.lsn()?,
                commit_time: r.i64()?,
                xid: r.u32()?,
            }),
            b'C' => Message::Commit(Commit {
                flags: r.u8()?,
                commit_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                commit_time: r.i64()?,
            }),
            b'O' => Message::Origin(Origin {
                commit_lsn: r.lsn()?,
                name: r.string()?,
            }),
            b'R' => Message::Relation(self.relation(&mut r)?),
            b'Y' => Message::Type(TypeMessage {
                xid: self.stream_xid(&mut r)?,
                oid: r.u32()?,
                namespace: r.string()?,
                name: r.string()?,
            }),
            b'I' => {
                let xid = self.stream_xid(&mut r)?;
                let relation_oid = r.u32()?;
                r.expect_kind(b"N")?;
                let tuple = r.tuple()?;
                // An insert carries every value: "unchanged TOAST" only makes
                // sense in an update, so such a row cannot be trusted.
                if tuple
                    .columns
                    .iter()
                    .any(|c| matches!(c, Column::UnchangedToast))
                {
                    return Err(DecodeError::Malformed {
                        tag: 'I',
                        reason: "an insert has an unchanged-TOAST ('u') column".into(),
                    });
                }
                Message::Insert(Insert {
                    xid,
                    relation_oid,
                    tuple,
                })
            }
            b'U' => {
                let xid = self.stream_xid(&mut r)?;
                let relation_oid = r.u32()?;
                let old = match r.expect_kind(b"KON")? {
                    b'N' => None,
                    kind => {
                        let old = r.tuple()?;
                        r.expect_kind(b"N")?;
                        Some((kind, old))
                    }
                };
                Message::Update(Update {
                    xid,
                    relation_oid,
                    old,
                    new: r.tuple()?,
                })
            }
            b'D' => Message::Delete(Delete {
                xid: self.stream_xid(&mut r)?,
                relation_oid: r.u32()?,
                kind: r.expect_kind(b"KO")?,
                old: r.tuple()?,
            }),
            b'T' => {
                let xid = self.stream_xid(&mut r)?;
                let count = r.u32()?;
                let options = r.u8()?;
                r.ensure_items(count, 4)?;
                let relation_oids = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
                Message::Truncate(Truncate {
                    xid,
                    options,
                    relation_oids,
                })
            }
            b'M' => {
                let xid = self.stream_xid(&mut r)?;
                let flags = r.u8()?;
                let lsn = r.lsn()?;
                let prefix = r.string()?;
                let len = r.length()?;
                Message::Message(LogicalMessage {
                    xid,
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: r.bytes(len)?,
                })
            }
            b'S' => Message::StreamStart(StreamStart {
                xid: r.u32()?,
                first_segment: match r.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(r.malformed(format!("first_segment is {other}"))),
                },
            }),
            b'E' => Message::StreamStop,
            b'c' => Message::StreamCommit(StreamCommit {
                xid: r.u32()?,
                flags: r.u8()?,
                commit_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                commit_time: r.i64()?,
            }),
            b'A' => {
                let xid = r.u32()?;
                let subxid = r.u32()?;
                // abort_lsn and abort_time follow only with streaming =
                // parallel (protocol 4); nothing in the message says which.
                let (abort_lsn, abort_time) = if r.remaining() == 0 {
                    (None, None)
                } else {
                    (Some(r.lsn()?), Some(r.i64()?))
                };
                Message::StreamAbort(StreamAbort {
                    xid,
                    subxid,
                    abort_lsn,
                    abort_time,
                })
            }
            b'b' => Message::BeginPrepare(BeginPrepare {
                prepare_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                prepare_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            }),
            b'P' => Message::Prepare(r.prepare_like()?),
            b'K' => Message::CommitPrepared(r.prepare_like()?),
            b'p' => Message::StreamPrepare(r.prepare_like()?),
            b'r' => Message::RollbackPrepared(RollbackPrepared {
                flags: r.u8()?,
                prepare_end_lsn: r.lsn()?,
                rollback_end_lsn: r.lsn()?,
                prepare_time: r.i64()?,
                rollback_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            }),
            _ => return Err(DecodeError::UnknownTag(tag)),
        };
        r.finish()?;
        match message {
            Message::StreamStart(_) => self.in_stream = true,
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }

    /// Inside a stream block, data messages carry the xid of the (sub)transaction.
    fn stream_xid(&self, r: &mut Reader) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            r.u32().map(Some)
        } else {
            Ok(None)
        }
    }

    fn relation(&self, r: &mut Reader) -> Result<Relation, DecodeError> {
        let xid = self.stream_xid(r)?;
        let oid = r.u32()?;
        let namespace = r.string()?;
        let name = r.string()?;
        let replica_identity = r.u8()?;
        let count = r.u16()?;
        // Smallest column: flags, empty name (its NUL), type oid, typmod.
        r.ensure_items(count.into(), 1 + 1 + 4 + 4)?;
        let mut columns = Vec::with_capacity(count.into());
        for _ in 0..count {
            columns.push(RelationColumn {
                flags: r.u8()?,
                name: r.string()?,
                type_oid: r.u32()?,
                type_modifier: r.i32()?,
            });
        }
        Ok(Relation {
            xid,
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }
}

/// A cursor over one message. Every read checks the bytes are there first.
struct Reader {
    buf: Bytes,
    pos: usize,
    tag: u8,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            tag: char::from(self.tag),
            offset: self.pos,
            needed,
        }
    }

    fn malformed(&self, reason: String) -> DecodeError {
        DecodeError::Malformed {
            tag: char::from(self.tag),
            reason,
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(head) = rest.get(..N) else {
            return Err(self.truncated(N - rest.len()));
        };
        let out = <[u8; N]>::try_from(head).expect("head is exactly N bytes long");
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_be_bytes)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_be_bytes)
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.array().map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// An Int32 byte count: negative is malformed.
    fn length(&mut self) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let len = self.i32()?;
        usize::try_from(len)
            .map_err(|_| self.malformed(format!("negative length {len} at offset {offset}")))
    }

    /// `len` bytes as a slice of the message: no copy.
    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(len - self.remaining()));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string. A missing NUL reads as truncation.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Truncated {
                tag: char::from(self.tag),
                offset: self.buf.len(),
                needed: 1,
            });
        };
        let text = std::str::from_utf8(&rest[..nul])
            .map_err(|e| {
                let at = self.pos + e.valid_up_to();
                self.malformed(format!("string is not valid UTF-8 (byte {at})"))
            })?
            .to_owned();
        self.pos += nul + 1;
        Ok(text)
    }

    /// Read a one-byte kind marker and check it is one of `allowed`.
    fn expect_kind(&mut self, allowed: &[u8]) -> Result<u8, DecodeError> {
        let offset = self.pos;
        let kind = self.u8()?;
        if allowed.contains(&kind) {
            Ok(kind)
        } else {
            Err(self.malformed(format!(
                "expected one of {:?} at offset {offset}, found {:?}",
                String::from_utf8_lossy(allowed),
                char::from(kind)
            )))
        }
    }

    /// Before allocating for `count` items, check that they can be there at
    /// all: each takes at least `min_size` bytes.
    fn ensure_items(&self, count: u32, min_size: usize) -> Result<(), DecodeError> {
        let needed = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(min_size))
            .unwrap_or(usize::MAX);
        if needed > self.remaining() {
            return Err(self.truncated(needed - self.remaining()));
        }
        Ok(())
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.u16()?;
        self.ensure_items(count.into(), 1)?;
        let mut columns = Vec::with_capacity(count.into());
        for _ in 0..count {
            let column = match self.expect_kind(b"nutb")? {
                b'n' => Column::Null,
                b'u' => Column::UnchangedToast,
                b't' => {
                    let len = self.length()?;
                    Column::Text(self.bytes(len)?)
                }
                _ => {
                    let len = self.length()?;
                    Column::Binary(self.bytes(len)?)
                }
            };
            columns.push(column);
        }
        Ok(TupleData { columns })
    }

    fn prepare_like(&mut self) -> Result<PrepareLike, DecodeError> {
        Ok(PrepareLike {
            flags: self.u8()?,
            lsn: self.lsn()?,
            end_lsn: self.lsn()?,
            time: self.i64()?,
            xid: self.u32()?,
            gid: self.string()?,
        })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                tag: char::from(self.tag),
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
