//! CopyData payloads of the streaming replication protocol: pure parse of the
//! server's `w` (XLogData) and `k` (keepalive), and encoding of the client's
//! `r` (standby status update). Big-endian; times are Int64 microseconds since
//! 2000-01-01 UTC.

use bytes::{Buf, BufMut, Bytes};

use super::{ReplicationError, ReplicationMessage};
use crate::lsn::Lsn;

const XLOG_DATA_TAG: u8 = b'w';
const KEEPALIVE_TAG: u8 = b'k';
const STATUS_UPDATE_TAG: u8 = b'r';

/// `w` + wal_start + wal_end + send_time.
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// `k` + wal_end + send_time + reply_requested.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// `r` + written + flushed + applied + client_time + reply_requested.
pub(crate) const STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// Parse one CopyData payload from the walsender. `data` of an XLogData is a
/// slice of `payload`, not a copy.
pub(crate) fn parse_copy_data(payload: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let Some(&tag) = payload.first() else {
        return Err(ReplicationError::Protocol(
            "empty CopyData message from the walsender".into(),
        ));
    };
    match tag {
        XLOG_DATA_TAG => {
            if payload.len() < XLOG_DATA_HEADER_LEN {
                return Err(short("XLogData ('w')", payload.len(), XLOG_DATA_HEADER_LEN));
            }
            let mut header = &payload[1..XLOG_DATA_HEADER_LEN];
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(header.get_u64()),
                wal_end: Lsn(header.get_u64()),
                send_time: header.get_i64(),
                data: payload.slice(XLOG_DATA_HEADER_LEN..),
            })
        }
        KEEPALIVE_TAG => {
            // Like pg_recvlogical, accept trailing bytes a newer server might add.
            if payload.len() < KEEPALIVE_LEN {
                return Err(short("keepalive ('k')", payload.len(), KEEPALIVE_LEN));
            }
            let mut body = &payload[1..KEEPALIVE_LEN];
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(body.get_u64()),
                send_time: body.get_i64(),
                reply_requested: body.get_u8() != 0,
            })
        }
        other => Err(ReplicationError::Protocol(format!(
            "unknown CopyData message '{}' from the walsender (expected 'w' or 'k')",
            other.escape_ascii()
        ))),
    }
}

fn short(what: &str, got: usize, need: usize) -> ReplicationError {
    ReplicationError::Protocol(format!(
        "{what} message from the walsender is {got} bytes, shorter than its {need}-byte header"
    ))
}

/// The payload of a standby status update (`r`), to be sent inside CopyData.
pub(crate) fn encode_status_update(
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    client_time: i64,
    reply_requested: bool,
) -> [u8; STATUS_UPDATE_LEN] {
    let mut out = [0u8; STATUS_UPDATE_LEN];
    let mut buf = &mut out[..];
    buf.put_u8(STATUS_UPDATE_TAG);
    buf.put_u64(written.0);
    buf.put_u64(flushed.0);
    buf.put_u64(applied.0);
    buf.put_i64(client_time);
    buf.put_u8(u8::from(reply_requested));
    debug_assert!(buf.is_empty(), "status update fills its buffer exactly");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn xlog(wal_start: u64, wal_end: u64, send_time: i64, data: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(wal_start);
        b.put_u64(wal_end);
        b.put_i64(send_time);
        b.put_slice(data);
        b.freeze()
    }

    fn keepalive(wal_end: u64, send_time: i64, reply: u8) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(wal_end);
        b.put_i64(send_time);
        b.put_u8(reply);
        b.freeze()
    }

    #[test]
    fn xlog_data_round_trips_without_copying() {
        let payload = xlog(
            0x16_B374_D848,
            0x16_B374_D900,
            767_000_000_123_456,
            b"B\x00\x01",
        );
        let msg = parse_copy_data(payload.clone()).unwrap();
        let ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            send_time,
            data,
        } = msg
        else {
            panic!("not XLogData");
        };
        assert_eq!(wal_start.to_string(), "16/B374D848");
        assert_eq!(wal_end, Lsn(0x16_B374_D900));
        assert_eq!(send_time, 767_000_000_123_456);
        assert_eq!(&data[..], b"B\x00\x01");
        assert_eq!(
            data.as_ptr(),
            payload[25..].as_ptr(),
            "data must be a slice"
        );

        // Header only: an empty pgoutput message is still a well-formed frame.
        let ReplicationMessage::XLogData { data, .. } =
            parse_copy_data(xlog(1, 2, -3, b"")).unwrap()
        else {
            panic!("not XLogData");
        };
        assert!(data.is_empty());
    }

    #[test]
    fn keepalive_round_trips() {
        assert_eq!(
            parse_copy_data(keepalive(u64::MAX, -1, 1)).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(u64::MAX),
                send_time: -1,
                reply_requested: true
            }
        );
        assert_eq!(
            parse_copy_data(keepalive(42, 7, 0)).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(42),
                send_time: 7,
                reply_requested: false
            }
        );
        let mut longer = BytesMut::from(&keepalive(42, 7, 0)[..]);
        longer.put_u8(9);
        assert!(
            parse_copy_data(longer.freeze()).is_ok(),
            "trailing bytes are tolerated"
        );
    }

    #[test]
    fn malformed_payloads_are_protocol_errors() {
        let full_w = xlog(1, 2, 3, b"");
        let full_k = keepalive(1, 2, 0);
        let mut cases = vec![
            Bytes::new(),
            Bytes::from_static(b"p\0\0\0"),
            Bytes::from_static(b"r"),
        ];
        cases.extend((1..full_w.len()).map(|n| full_w.slice(..n)));
        cases.extend((1..full_k.len()).map(|n| full_k.slice(..n)));
        for case in cases {
            let err = parse_copy_data(case.clone()).unwrap_err();
            assert!(
                matches!(err, ReplicationError::Protocol(_)),
                "{case:?}: {err:?}"
            );
        }
    }

    #[test]
    fn status_update_layout() {
        let out = encode_status_update(Lsn(0x0102_0304_0506_0708), Lsn(2), Lsn(3), -2, true);
        let mut b = &out[..];
        assert_eq!(b.get_u8(), b'r');
        assert_eq!(b.get_u64(), 0x0102_0304_0506_0708);
        assert_eq!(b.get_u64(), 2);
        assert_eq!(b.get_u64(), 3);
        assert_eq!(b.get_i64(), -2);
        assert_eq!(b.get_u8(), 1);
        assert!(b.is_empty());
        assert_eq!(out[1..9], [1, 2, 3, 4, 5, 6, 7, 8], "big-endian");
        assert_eq!(
            encode_status_update(Lsn(0), Lsn(0), Lsn(0), 0, false)[33],
            0
        );
    }
}
