//! The client and stream against a scripted in-memory server.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn xlog_frame(wal_start: u64, wal_end: u64, data: &[u8]) -> Vec<u8> {
    let mut p = BytesMut::new();
    p.put_u8(b'w');
    p.put_u64(wal_start);
    p.put_u64(wal_end);
    p.put_i64(1234);
    p.put_slice(data);
    frame(b'd', &p)
}

fn keepalive_frame(wal_end: u64, reply: bool) -> Vec<u8> {
    let mut p = BytesMut::new();
    p.put_u8(b'k');
    p.put_u64(wal_end);
    p.put_i64(99);
    p.put_u8(u8::from(reply));
    frame(b'd', &p)
}

fn stream_pair() -> (ReplicationStream, DuplexStream) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let stream = ReplicationStream {
        conn: Connection::new(Box::new(client), 1 << 20),
        server_version_num: 150004,
        backend_pid: 42,
        server_done: false,
    };
    (stream, server)
}

/// Read one frontend message (tag, body).
async fn read_message(server: &mut DuplexStream) -> (u8, Vec<u8>) {
    let tag = server.read_u8().await.unwrap();
    let len = server.read_i32().await.unwrap();
    let mut body = vec![0; len as usize - 4];
    server.read_exact(&mut body).await.unwrap();
    (tag, body)
}

#[tokio::test]
async fn dropped_next_message_loses_no_bytes() {
    let (mut stream, mut server) = stream_pair();
    let wire = xlog_frame(0x100, 0x180, b"Ihello");
    for cut in [1, 5, 20, wire.len() - 1] {
        server.write_all(&wire[..cut]).await.unwrap();
        // Poll once with half a frame buffered, then drop the future, as a
        // losing `select!` branch would.
        assert!(stream.next_message().now_or_never().is_none(), "cut {cut}");
        server.write_all(&wire[cut..]).await.unwrap();
        let msg = stream.next_message().await.unwrap().unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x100),
                wal_end: Lsn(0x180),
                send_time: 1234,
                data: Bytes::from_static(b"Ihello"),
            }
        );
    }
}

#[tokio::test]
async fn streams_messages_until_copy_done() {
    let (mut stream, mut server) = stream_pair();
    let mut wire = keepalive_frame(0x200, true);
    wire.extend(frame(b'N', b"SWARNING\0VWARNING\0C01000\0Mjust saying\0\0"));
    wire.extend(xlog_frame(0, 0, b"R..."));
    wire.extend(frame(b'c', b""));
    server.write_all(&wire).await.unwrap();

    assert_eq!(
        stream.next_message().await.unwrap(),
        Some(ReplicationMessage::Keepalive {
            wal_end: Lsn(0x200),
            send_time: 99,
            reply_requested: true
        })
    );
    assert!(matches!(
        stream.next_message().await.unwrap(),
        Some(ReplicationMessage::XLogData { .. })
    ));
    assert_eq!(stream.next_message().await.unwrap(), None);
    assert_eq!(stream.next_message().await.unwrap(), None, "stays ended");
}

#[tokio::test]
async fn server_error_eof_and_garbage() {
    let (mut stream, mut server) = stream_pair();
    server
        .write_all(&frame(
            b'E',
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
        ))
        .await
        .unwrap();
    match stream.next_message().await {
        Err(ReplicationError::Server(e)) => {
            assert_eq!(e.code, "57P01");
            assert_eq!(e.severity, "FATAL");
        }
        other => panic!("{other:?}"),
    }
    drop(server);
    assert!(matches!(
        stream.next_message().await,
        Err(ReplicationError::Closed)
    ));

    let (mut stream, mut server) = stream_pair();
    server.write_all(&frame(b'd', b"w\0\0\0")).await.unwrap();
    assert!(matches!(
        stream.next_message().await,
        Err(ReplicationError::Protocol(_))
    ));

    let (mut stream, mut server) = stream_pair();
    server.write_all(&frame(b'Z', b"I")).await.unwrap();
    assert!(matches!(
        stream.next_message().await,
        Err(ReplicationError::Protocol(_))
    ));
}

#[tokio::test]
async fn status_update_on_the_wire() {
    let (mut stream, mut server) = stream_pair();
    let before = crate::lsn::pg_now_micros();
    stream
        .send_status_update(Lsn(0x30), Lsn(0x20), Lsn(0x10), true)
        .await
        .unwrap();
    let (tag, body) = read_message(&mut server).await;
    assert_eq!(tag, b'd');
    assert_eq!(body.len(), 34);
    let mut b = &body[..];
    assert_eq!(b.get_u8(), b'r');
    assert_eq!(b.get_u64(), 0x30);
    assert_eq!(b.get_u64(), 0x20);
    assert_eq!(b.get_u64(), 0x10);
    let client_time = b.get_i64();
    assert!(client_time >= before && client_time <= crate::lsn::pg_now_micros());
    assert_eq!(b.get_u8(), 1);
}

#[tokio::test]
async fn finish_drains_then_terminates() {
    let (stream, mut server) = stream_pair();
    let server_task = tokio::spawn(async move {
        assert_eq!(read_message(&mut server).await, (b'c', vec![]));
        let mut wire = xlog_frame(1, 2, b"late");
        wire.extend(frame(b'c', b""));
        wire.extend(frame(b'C', b"START_REPLICATION\0"));
        wire.extend(frame(b'Z', b"I"));
        server.write_all(&wire).await.unwrap();
        assert_eq!(read_message(&mut server).await, (b'X', vec![]));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    });
    stream.finish(Duration::from_secs(5)).await.unwrap();
    server_task.await.unwrap();
}

#[tokio::test]
async fn finish_is_bounded_by_its_timeout() {
    let (stream, _server) = stream_pair();
    let started = std::time::Instant::now();
    stream.finish(Duration::from_millis(50)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn finish_after_server_went_away() {
    let (mut stream, mut server) = stream_pair();
    server.write_all(&frame(b'C', b"COPY 0\0")).await.unwrap();
    drop(server);
    assert_eq!(stream.next_message().await.unwrap(), None);
    stream.finish(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn buffered_frames_are_taken_without_waiting_and_never_lost() {
    let (mut stream, mut server) = stream_pair();
    // Three whole frames and half of a fourth arrive in one write.
    let fourth = xlog_frame(0x400, 0x400, b"Cfour");
    let mut wire = xlog_frame(0x100, 0x100, b"Bone");
    wire.extend(frame(b'N', b"SNOTICE\0VNOTICE\0C00000\0Mskipped\0\0"));
    wire.extend(xlog_frame(0x200, 0x200, b"Itwo"));
    wire.extend(keepalive_frame(0x300, false));
    wire.extend(&fourth[..7]);
    server.write_all(&wire).await.unwrap();

    let wal_end = |m: ReplicationMessage| match m {
        ReplicationMessage::XLogData { wal_end, .. } => wal_end,
        ReplicationMessage::Keepalive { wal_end, .. } => wal_end,
    };
    // The first comes through the socket read, the rest from its buffer.
    assert_eq!(
        wal_end(stream.next_message().await.unwrap().unwrap()),
        Lsn(0x100)
    );
    assert_eq!(
        wal_end(stream.try_next_buffered().unwrap().unwrap()),
        Lsn(0x200)
    );
    assert_eq!(
        wal_end(stream.try_next_buffered().unwrap().unwrap()),
        Lsn(0x300)
    );
    // Half a frame is not a message; it stays buffered for the next read.
    assert_eq!(stream.try_next_buffered().unwrap(), None);
    assert_eq!(stream.try_next_buffered().unwrap(), None);
    server.write_all(&fourth[7..]).await.unwrap();
    assert_eq!(
        wal_end(stream.next_message().await.unwrap().unwrap()),
        Lsn(0x400)
    );

    // CopyDone seen from the buffer ends the stream for both paths.
    let mut wire = xlog_frame(0x500, 0x500, b"Ifive");
    wire.extend(frame(b'c', b""));
    server.write_all(&wire).await.unwrap();
    assert_eq!(
        wal_end(stream.next_message().await.unwrap().unwrap()),
        Lsn(0x500)
    );
    assert_eq!(stream.try_next_buffered().unwrap(), None);
    assert_eq!(stream.next_message().await.unwrap(), None);
}
