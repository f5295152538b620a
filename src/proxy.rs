//! A delaying TCP proxy for tests and `bite-sync bench`: it stands between bite-sync and a
//! server on loopback and makes the link behave like a WAN (50–150 ms each way) that can be cut
//! or go down on demand.
//!
//! Each connection is two pipes (client → server, server → client). In each, a reader stamps
//! every chunk it reads with a release time (now + the one-way delay) and queues it; a writer
//! sends each chunk when its time comes. The delay therefore adds latency without capping
//! throughput: many chunks are in flight at once, as on a long fat pipe.
//!
//! Invariants:
//! - Bytes leave in the order they came, unchanged, each no earlier than its release time.
//! - At most [`IN_FLIGHT_BYTES`] per direction wait in a queue; a reader that gets ahead waits
//!   for the writer (TCP flow control does the rest), so memory stays bounded.
//! - An end of stream is forwarded (as a half-close, after the delay); a read or write error
//!   on either side aborts both sides with a reset, as a broken link would.
//! - [`Proxy::cut`] resets every open connection at once; new connections are still accepted.
//!   Dropping the [`Proxy`] stops the listener and resets every connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How many bytes one direction of one connection may hold in its queue: the proxy's window.
/// 16 MiB at 150 ms allows over 100 MB/s, far beyond what the benchmarks move.
pub const IN_FLIGHT_BYTES: usize = 16 << 20;

/// Bytes read per chunk at most.
const CHUNK: usize = 64 * 1024;

/// A TCP proxy on 127.0.0.1 that adds latency, cuts connections and refuses new ones on demand.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

/// What the proxy's handle and its tasks share.
struct Shared {
    target: SocketAddr,
    /// The one-way delay in nanoseconds.
    delay_nanos: AtomicU64,
    refusing: AtomicBool,
    /// Open connections.
    open: AtomicUsize,
    /// Cancelled by [`Proxy::cut`] (and replaced by a fresh one), so only the connections open
    /// at the time of the cut see it.
    cut: Mutex<CancellationToken>,
    /// Cancelled when the proxy is dropped.
    stop: CancellationToken,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }

    fn cut_token(&self) -> CancellationToken {
        self.cut
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection to `target`, with no
    /// delay until [`Proxy::set_delay`].
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            delay_nanos: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            cut: Mutex::new(CancellationToken::new()),
            stop: CancellationToken::new(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds `one_way` of latency in each direction (a round trip takes twice that), for data
    /// read from now on. Throughput is not capped.
    pub fn set_delay(&self, one_way: Duration) {
        let nanos = u64::try_from(one_way.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Resets every open connection (both sides see a reset or end of stream); new connections
    /// are still accepted.
    pub fn cut(&self) {
        let old = std::mem::take(
            &mut *self
                .shared
                .cut
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        old.cancel();
    }

    /// While `true`, new connections are accepted and closed at once, as if the far side were
    /// down; open connections are left alone.
    pub fn set_refusing(&self, refuse: bool) {
        self.shared.refusing.store(refuse, Ordering::Relaxed);
    }

    /// How many connections are open through the proxy now.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.stop.cancelled() => return,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::debug!(%error, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.refusing.load(Ordering::Relaxed) {
            drop(client);
            continue;
        }
        tokio::spawn(serve(client, shared.clone()));
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection ended.
enum End {
    /// Both directions reached end of stream and were half-closed in turn.
    Closed,
    /// A socket failed, or the proxy cut the connection: reset both sides.
    Abort,
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let cut = shared.cut_token();
    let upstream = tokio::select! {
        connected = TcpStream::connect(shared.target) => connected,
        () = cut.cancelled() => return,
        () = shared.stop.cancelled() => return,
    };
    let Ok(upstream) = upstream else {
        // The far side is down: the client sees its connection closed, as through a real
        // proxy.
        return;
    };
    shared.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(shared.clone());
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Extra handles on the sockets, so a reset can be arranged after the halves moved away.
    let handles = (
        client.as_fd().try_clone_to_owned(),
        upstream.as_fd().try_clone_to_owned(),
    );
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();

    let end = tokio::select! {
        // The first error in either direction ends both.
        piped = async {
            tokio::try_join!(
                pipe(client_read, upstream_write, &shared),
                pipe(upstream_read, client_write, &shared),
            )
        } => if piped.is_ok() { End::Closed } else { End::Abort },
        () = cut.cancelled() => End::Abort,
        () = shared.stop.cancelled() => End::Abort,
    };
    if let (End::Abort, (Ok(client), Ok(upstream))) = (end, handles) {
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
    // The halves were dropped with the futures above; the extra handles close last, so the
    // sockets close here (with a reset when aborting).
}

/// SO_LINGER 0: closing sends RST instead of FIN, as a broken link would look to each side.
fn reset_on_close(socket: &OwnedFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// A chunk on its way, or the end of the stream; released at `at`.
struct Delayed {
    at: Instant,
    bytes: Option<Bytes>,
}

/// Copies one direction with the current delay; ends after forwarding end of stream.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
) -> std::io::Result<()> {
    let (queue, mut released) = mpsc::unbounded_channel::<Delayed>();
    let budget = &Semaphore::new(IN_FLIGHT_BYTES);
    let reader = async move {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            let read = from.read_buf(&mut buf).await?;
            let at = Instant::now() + shared.delay();
            if read == 0 {
                let _ = queue.send(Delayed { at, bytes: None });
                return Ok(());
            }
            let bytes = buf.split().freeze();
            // Waits while the writer is IN_FLIGHT_BYTES behind.
            let permits = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            if let Ok(permit) = budget.acquire_many(permits).await {
                permit.forget();
            }
            if queue
                .send(Delayed {
                    at,
                    bytes: Some(bytes),
                })
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some(chunk) = released.recv().await {
            if chunk.at > Instant::now() {
                tokio::time::sleep_until(chunk.at).await;
            }
            match chunk.bytes {
                Some(bytes) => {
                    to.write_all(&bytes).await?;
                    budget.add_permits(bytes.len());
                }
                None => {
                    to.shutdown().await?;
                    return Ok(());
                }
            }
        }
        Ok(())
    };
    // Either side failing fails the pipe (and so the connection) at once; the reader finishing
    // only means the writer has the rest to deliver.
    tokio::try_join!(reader, writer).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    /// An echo server on loopback: writes back whatever it reads, until end of stream.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> Duration {
        let started = StdInstant::now();
        stream.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ping");
        started.elapsed()
    }

    #[tokio::test]
    async fn forwards_and_delays_both_ways() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let fast = round_trip(&mut stream).await;
        assert!(fast < Duration::from_millis(50), "no delay yet: {fast:?}");

        proxy.set_delay(Duration::from_millis(60));
        let slow = round_trip(&mut stream).await;
        assert!(
            slow >= Duration::from_millis(120),
            "a round trip crosses the delay twice: {slow:?}"
        );
        assert!(slow < Duration::from_millis(600), "{slow:?}");
        assert_eq!(proxy.connections(), 1);
    }

    #[tokio::test]
    async fn delay_does_not_cap_throughput() {
        const TOTAL: usize = 10 << 20;
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        proxy.set_delay(Duration::from_millis(50));
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let started = StdInstant::now();
        let sender = tokio::spawn(async move {
            let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
        });
        let mut received = Vec::with_capacity(TOTAL);
        read.read_to_end(&mut received).await.unwrap();
        let elapsed = started.elapsed();
        sender.await.unwrap();
        assert_eq!(received.len(), TOTAL);
        assert!(
            received
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i % 251) as u8),
            "bytes arrive unchanged and in order"
        );
        // 10 MB out and back through 2 × 50 ms: a proxy that slept per read (at most 64 KiB)
        // would take 160 × 100 ms = 16 s; the bound leaves room for a loaded machine.
        assert!(
            elapsed < Duration::from_secs(4),
            "10 MB echoed through a 50 ms proxy took {elapsed:?}"
        );
        assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    }

    #[tokio::test]
    async fn cut_resets_open_connections_and_keeps_accepting() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut second = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut first).await;
        round_trip(&mut second).await;
        assert_eq!(proxy.connections(), 2);

        proxy.cut();
        for stream in [&mut first, &mut second] {
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("a cut connection does not hang");
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "a cut connection reads end of stream or an error: {read:?}"
            );
        }
        wait_until(|| proxy.connections() == 0).await;

        let mut third = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut third).await;
        assert_eq!(proxy.connections(), 1);
    }

    #[tokio::test]
    async fn refusing_closes_new_connections_only() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut open).await;

        proxy.set_refusing(true);
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = refused.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf))
            .await
            .expect("a refused connection does not hang");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        round_trip(&mut open).await;
        assert_eq!(proxy.connections(), 1);

        proxy.set_refusing(false);
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut again).await;
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_everything() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let addr = proxy.addr();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut stream).await;
        drop(proxy);
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the connection closes");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let listener_gone = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if TcpStream::connect(addr).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(listener_gone.is_ok(), "the listener stops");
    }

    async fn wait_until(condition: impl Fn() -> bool) {
        let deadline = StdInstant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(
                StdInstant::now() < deadline,
                "timed out waiting for a condition"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
