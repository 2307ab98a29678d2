//! A TCP proxy for network faults between the relay and its servers.
//!
//! The relay is pointed at [`Proxy::addr`] instead of the server; the proxy forwards
//! every connection to its upstream and, on command:
//!
//! - [`cut`](Proxy::cut): resets every open connection and refuses new ones (accepts
//!   and resets them at once) until [`resume`](Proxy::resume): a network cut.
//! - [`stall`](Proxy::stall): stops moving bytes in both directions while keeping
//!   every socket open; new connections are accepted but not connected upstream until
//!   [`resume`](Proxy::resume): a partition where packets vanish and TCP just waits.
//! - [`reset_all`](Proxy::reset_all): resets the open connections once and keeps
//!   forwarding new ones: a blip.
//!
//! It runs on a thread of its own with its own Tokio runtime, so the test's blocking
//! harness calls (a PostgreSQL restart, say) never slow it down, and dropping it
//! inside an async test is fine.
//!
//! For Kafka, clients bootstrap and then connect to the address the broker advertises:
//! start the broker with [`Broker::start_behind_proxy`](super::Broker::start_behind_proxy),
//! which makes it advertise the proxy, so every connection of the relay goes through it.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long connecting to the upstream may take before the client is reset.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy does with bytes and connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything.
    Forward,
    /// Move no bytes; keep sockets open; hold new connections.
    Stall,
    /// Reset open connections (when entering the mode) and new ones.
    Cut,
}

/// Counters, for the test's report.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted (refused ones included).
    pub accepted: AtomicU64,
    /// Connections reset by `cut` / `reset_all` or refused while cut.
    pub reset: AtomicU64,
    /// Connections currently open (client side).
    pub open: AtomicU64,
}

struct Shared {
    mode: watch::Sender<ProxyMode>,
    /// Bumped to reset every connection opened before the bump.
    generation: watch::Sender<u64>,
    upstream: Mutex<Option<SocketAddr>>,
    stats: ProxyStats,
}

/// A TCP proxy on 127.0.0.1 (ephemeral port). `Drop` stops it and closes everything.
pub struct Proxy {
    name: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy forwarding to `upstream`.
    pub fn start(name: &str, upstream: SocketAddr) -> Proxy {
        let proxy = Proxy::start_without_upstream(name);
        proxy.set_upstream(upstream);
        proxy
    }

    /// A proxy whose upstream is set later with [`set_upstream`](Self::set_upstream)
    /// (for a broker that must advertise the proxy's address before it starts);
    /// until then it resets every connection.
    pub fn start_without_upstream(name: &str) -> Proxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy on 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("make the proxy listener non-blocking");
        let addr = std_listener.local_addr().expect("proxy listener address");
        let (mode, _) = watch::channel(ProxyMode::Forward);
        let (generation, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            mode,
            generation,
            upstream: Mutex::new(None),
            stats: ProxyStats::default(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{name}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let listener =
                        TcpListener::from_std(std_listener).expect("register proxy listener");
                    accept_loop(listener, thread_shared, shutdown_rx).await;
                });
                // Dropping the runtime cancels every connection task: sockets close.
            })
            .expect("spawn the proxy thread");
        Proxy {
            name: name.to_string(),
            addr,
            shared,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where clients connect: `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where new connections go (open ones keep their upstream).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("proxy upstream lock") = Some(upstream);
    }

    pub fn mode(&self) -> ProxyMode {
        *self.shared.mode.borrow()
    }

    /// Reset every open connection and refuse new ones until `resume`.
    pub fn cut(&self) {
        self.shared.mode.send_replace(ProxyMode::Cut);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Stop moving bytes (sockets stay open) until `resume`.
    pub fn stall(&self) {
        self.shared.mode.send_replace(ProxyMode::Stall);
    }

    /// Forward again: stalled bytes flow on, new connections are served.
    pub fn resume(&self) {
        self.shared.mode.send_replace(ProxyMode::Forward);
    }

    /// Reset every open connection once; new ones are served as the mode says.
    pub fn reset_all(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> u64 {
        self.shared.stats.open.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // EMFILE and the like: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if *shared.mode.borrow() == ProxyMode::Cut {
            shared.stats.reset.fetch_add(1, Ordering::Relaxed);
            reset(client);
            continue;
        }
        tokio::spawn(serve(client, shared.clone()));
    }
}

/// Close with RST, as a cut network path looks to the peer once it notices.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Waits while the proxy is stalled; `false` when it is cut (or gone).
async fn wait_forwarding(mode: &mut watch::Receiver<ProxyMode>) -> bool {
    loop {
        let now = *mode.borrow_and_update();
        match now {
            ProxyMode::Forward => return true,
            ProxyMode::Cut => return false,
            ProxyMode::Stall => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

struct OpenGuard<'a>(&'a ProxyStats);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    shared.stats.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&shared.stats);
    let mut generation = shared.generation.subscribe();
    let mut mode = shared.mode.subscribe();
    let _ = client.set_nodelay(true);

    // Connect upstream only once forwarding: a stalled network answers nothing.
    let connected = async {
        if !wait_forwarding(&mut mode).await {
            return None;
        }
        let upstream = (*shared.upstream.lock().expect("proxy upstream lock"))?;
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => Some(s),
            _ => None,
        }
    };
    let server = tokio::select! {
        _ = generation.changed() => None,
        s = connected => s,
    };
    let Some(server) = server else {
        shared.stats.reset.fetch_add(1, Ordering::Relaxed);
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);

    let fds = [client.as_raw_fd(), server.as_raw_fd()];
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, shared.mode.subscribe());
    let down = pump(server_read, client_write, shared.mode.subscribe());
    let both = async { tokio::try_join!(up, down) };
    tokio::pin!(both);
    let finished = tokio::select! {
        _ = generation.changed() => false,
        r = &mut both => r.is_ok(),
    };
    if !finished {
        // Cut, or one side failed: reset both sockets. The pumps (pinned above)
        // still own them, so the descriptors are valid until `both` is dropped.
        shared.stats.reset.fetch_add(1, Ordering::Relaxed);
        for fd in fds {
            set_zero_linger(fd);
        }
    }
    // `both` (and with it both sockets) is dropped here.
}

/// `SO_LINGER` {on, 0}: closing the socket then sends RST instead of FIN.
fn set_zero_linger(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by a live tokio stream; the option value
    // is a properly sized `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Copies `from` to `to` while forwarding. On EOF it half-closes `to` and returns
/// the halves (so the other direction can finish); on a cut or an error it fails,
/// which drops (closes) both.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) -> std::io::Result<(OwnedReadHalf, OwnedWriteHalf)> {
    let cut = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "proxy cut");
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !wait_forwarding(&mut mode).await {
            return Err(cut());
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok((from, to));
        }
        // Bytes read just before a stall are held back until it ends.
        if !wait_forwarding(&mut mode).await {
            return Err(cut());
        }
        to.write_all(&buf[..n]).await?;
    }
}
