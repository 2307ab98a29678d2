//! Framing of backend (server → client) messages.
//!
//! Every backend message is `Byte1 tag, Int32 length (counting itself), body`.
//! [`BackendCodec`] reads that header itself so it can refuse an oversized
//! message before buffering its body, then hands the body to
//! [`backend::parse_body`](super::backend::parse_body), which also knows `W`
//! (CopyBothResponse) that `postgres-protocol`'s parser does not.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

use super::backend::{parse_body, BackendMessage};
use super::ReplicationError;

/// Bytes in a message header: Byte1 tag + Int32 length.
const HEADER_LEN: usize = 5;

/// Splits the byte stream into [`BackendMessage`]s, refusing any message
/// larger than `max_frame_bytes` (counting the tag and length) before its body
/// is buffered.
#[derive(Debug, Clone)]
pub(crate) struct BackendCodec {
    max_frame_bytes: usize,
}

impl BackendCodec {
    pub(crate) fn new(max_frame_bytes: usize) -> Self {
        BackendCodec { max_frame_bytes }
    }
}

impl Decoder for BackendCodec {
    type Item = BackendMessage;
    type Error = ReplicationError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BackendMessage>, ReplicationError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = src[0];
        let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        if len < 4 {
            return Err(ReplicationError::Protocol(format!(
                "message '{}' declares length {len}, below the minimum of 4",
                tag.escape_ascii()
            )));
        }
        // `len` counts itself but not the tag byte.
        let size = len as usize + 1;
        if size > self.max_frame_bytes {
            return Err(ReplicationError::FrameTooLarge {
                size,
                max: self.max_frame_bytes,
            });
        }
        if src.len() < size {
            src.reserve(size - src.len());
            return Ok(None);
        }
        let mut body = src.split_to(size).freeze();
        body.advance(HEADER_LEN);
        parse_body(tag, body).map(Some)
    }

    fn decode_eof(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<BackendMessage>, ReplicationError> {
        match self.decode(buf)? {
            Some(message) => Ok(Some(message)),
            None if buf.is_empty() => Ok(None),
            // The connection ended in the middle of a message.
            None => Err(ReplicationError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    /// Build one framed message.
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn copy_data_is_a_slice_of_the_frame() {
        let wire = frame(b'd', &[7u8; 100]);
        let mut buf = BytesMut::from(&wire[..]);
        let base = buf.as_ptr() as usize;
        let Some(BackendMessage::CopyData(data)) =
            BackendCodec::new(1024).decode(&mut buf).unwrap()
        else {
            panic!("no CopyData");
        };
        assert_eq!(
            data.as_ptr() as usize,
            base + HEADER_LEN,
            "payload was copied"
        );
    }

    #[test]
    fn frame_split_across_reads_is_assembled() {
        let mut wire = frame(b'S', b"a\0b\0");
        wire.extend(frame(b'Z', b"I"));
        for cut in 0..wire.len() {
            let mut codec = BackendCodec::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in [&wire[..cut], &wire[cut..]] {
                buf.extend_from_slice(chunk);
                while let Some(m) = codec.decode(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(
                got,
                vec![
                    BackendMessage::ParameterStatus {
                        name: "a".into(),
                        value: "b".into()
                    },
                    BackendMessage::ReadyForQuery { status: b'I' },
                ],
                "cut at {cut}"
            );
        }
        // One byte at a time.
        let mut codec = BackendCodec::new(1024);
        let mut buf = BytesMut::new();
        let mut got = 0;
        for b in &wire {
            buf.put_u8(*b);
            while codec.decode(&mut buf).unwrap().is_some() {
                got += 1;
            }
        }
        assert_eq!(got, 2);
    }

    #[test]
    fn oversize_frame_is_refused_before_buffering() {
        let mut codec = BackendCodec::new(1024);
        // Only the header has arrived; it announces 1 GiB.
        let mut buf = BytesMut::from(&[b'd', 0x40, 0, 0, 0][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, ReplicationError::FrameTooLarge { size, max: 1024 } if size == 0x4000_0001),
            "{err:?}"
        );
        assert!(buf.capacity() < 1 << 20, "body space was reserved");

        // The limit counts the whole message: exactly max passes, max + 1 fails.
        let ok = frame(b'd', &[0u8; 1019]);
        assert_eq!(ok.len(), 1024);
        assert!(BackendCodec::new(1024)
            .decode(&mut BytesMut::from(&ok[..]))
            .unwrap()
            .is_some());
        let too_big = frame(b'd', &[0u8; 1020]);
        assert!(matches!(
            BackendCodec::new(1024).decode(&mut BytesMut::from(&too_big[..])),
            Err(ReplicationError::FrameTooLarge {
                size: 1025,
                max: 1024
            })
        ));
    }

    #[test]
    fn bad_lengths_and_bodies_are_errors() {
        for case in [
            vec![b'Z', 0, 0, 0, 3],             // length below 4
            vec![b'Z', 0xff, 0xff, 0xff, 0xff], // negative length
            frame(b'Z', b"II"),                 // body error surfaces through the codec
        ] {
            let err = BackendCodec::new(1024)
                .decode(&mut BytesMut::from(&case[..]))
                .unwrap_err();
            assert!(
                matches!(err, ReplicationError::Protocol(_)),
                "{case:?}: {err:?}"
            );
        }
    }

    #[test]
    fn eof_inside_a_frame_is_closed() {
        let mut codec = BackendCodec::new(1024);
        let wire = frame(b'd', b"wxyz");
        let mut buf = BytesMut::from(&wire[..6]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(ReplicationError::Closed)
        ));
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let tag = b"RSZDEdcW"[(next() % 8) as usize];
            let body: Vec<u8> = (0..next() % 40).map(|_| next() as u8).collect();
            let mut wire = BytesMut::from(&frame(tag, &body)[..]);
            if next() % 2 == 0 {
                let i = (next() % wire.len() as u64) as usize;
                wire[i] = next() as u8; // may corrupt the header too
            }
            let mut codec = BackendCodec::new(64);
            while let Ok(Some(_)) = codec.decode(&mut wire) {}
            let _ = codec.decode_eof(&mut wire);
        }
    }
}
