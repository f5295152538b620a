//! The relay's HTTP connections: accepting, timing out and limiting them (hyper HTTP/1.1
//! under the axum router).
//!
//! The relay faces the internet with no proxy of its own in front, so a client that connects
//! and then sends nothing, or sends a byte a minute, must not be able to keep a connection,
//! and many of them must not be able to stop it from answering. Invariants:
//! - **Timeouts.** A connection that has not sent a whole request head `header` after it
//!   opened or after its request began, or that sat idle `idle` between two requests, is
//!   closed ([`HttpTimeouts`]); reading a body is bounded by the handlers ([`super::body`]).
//! - **A limit from the descriptor limit.** At most [`max_connections`] connections are open:
//!   the process's `RLIMIT_NOFILE` less what the database pool, outgoing HTTP clients and
//!   the process itself need ([`RESERVED_DESCRIPTORS`]), so `accept` never runs the process
//!   out of descriptors (which used to stop every answer, health included).
//! - **Room for new requests.** When the limit is reached, the connection that has been
//!   waiting longest without a request in progress (never sent one, idle, or still sending
//!   its head) is closed to let the new one in; a connection whose request is being handled
//!   is never closed for room. So a flood of silent or slow connections only ever costs its
//!   own oldest connections, and a real request (Meta's, Railway's health check) gets in.
//! - **Shutdown.** On cancel the listener closes, requests in progress are answered, idle
//!   connections close, and [`serve`] returns when all are gone (or after [`DRAIN_LIMIT`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::settings::HttpTimeouts;

/// Descriptors kept for everything but client connections: the database pool (16), the
/// alert watcher's connection, outgoing HTTP (Graph API, AI providers, push delivery), the
/// listener, stdio, the runtime's own, with room to spare.
pub const RESERVED_DESCRIPTORS: u64 = 80;
/// The most connections, however many descriptors: each idle connection costs memory too
/// (about 10 KiB), and Railway's edge reuses its connections.
pub const MAX_CONNECTIONS_CAP: usize = 2048;
/// The fewest connections the relay works with (a warning says the descriptor limit is low).
pub const MIN_CONNECTIONS: usize = 8;
/// How long a shutdown waits for connections to finish.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// The connection limit for a descriptor limit of `nofile`.
pub fn max_connections(nofile: u64) -> usize {
    let free = nofile.saturating_sub(RESERVED_DESCRIPTORS);
    usize::try_from(free)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS_CAP)
}

/// The process's descriptor limit, raised to its hard limit first (as Go's runtime and most
/// servers do: the soft default of 1024 is a historical accident, the hard limit is the
/// operator's choice).
pub fn descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max.min(1 << 20),
                rlim_max: limit.rlim_max,
            };
            if raised.rlim_cur > limit.rlim_cur
                && libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0
            {
                limit.rlim_cur = raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// What a connection is doing, for its timeouts and for choosing one to close for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Open, nothing received yet.
    New(Instant),
    /// A request's head is arriving.
    Head(Instant),
    /// A request is being handled.
    Busy,
    /// Between two requests.
    Idle(Instant),
}

struct Conn {
    phase: Mutex<Phase>,
    changed: Notify,
    close: CancellationToken,
}

impl Conn {
    fn phase(&self) -> Phase {
        *self.phase.lock().expect("never poisoned")
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().expect("never poisoned") = phase;
        self.changed.notify_one();
    }

    /// Bytes arrived: a new request's head begins, if none was under way.
    fn received(&self) {
        let mut phase = self.phase.lock().expect("never poisoned");
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            self.changed.notify_one();
        } else if let Phase::New(opened) = *phase {
            // The head timeout runs from when the connection opened.
            *phase = Phase::Head(opened);
        }
    }

    /// When the connection is to be closed, as things stand.
    fn deadline(&self, timeouts: &HttpTimeouts) -> Option<Instant> {
        match self.phase() {
            Phase::New(since) | Phase::Head(since) => Some(since + timeouts.header),
            Phase::Idle(since) => Some(since + timeouts.idle),
            Phase::Busy => None,
        }
    }

    /// Since when it has waited without a request in progress.
    fn waiting_since(&self) -> Option<Instant> {
        match self.phase() {
            Phase::New(t) | Phase::Head(t) | Phase::Idle(t) => Some(t),
            Phase::Busy => None,
        }
    }
}

/// The open connections.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
    evicted: AtomicU64,
}

impl Registry {
    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            phase: Mutex::new(Phase::New(Instant::now())),
            changed: Notify::new(),
            close: CancellationToken::new(),
        });
        self.open
            .lock()
            .expect("never poisoned")
            .insert(id, Arc::clone(&conn));
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("never poisoned").remove(&id);
    }

    /// Closes the connection waiting longest without a request in progress; false if every
    /// connection is handling a request.
    fn evict_one(&self) -> bool {
        let open = self.open.lock().expect("never poisoned");
        let oldest = open
            .values()
            .filter(|c| !c.close.is_cancelled())
            .filter_map(|c| c.waiting_since().map(|t| (t, c)))
            .min_by_key(|(t, _)| *t);
        match oldest {
            Some((_, conn)) => {
                conn.close.cancel();
                self.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// How long a closing connection keeps reading (and dropping) what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// The most bytes read and dropped while lingering.
const LINGER_BYTES: usize = 8 * 1024 * 1024;

/// The IO of one connection, telling it when bytes arrive.
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
    /// While closing: until when unread bytes are drained, and how many were.
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// A lingering close: after the relay's FIN, what the client is still sending (the rest of
    /// a body refused early, say with 413) is read and dropped for a moment, so the kernel does
    /// not answer it with a reset that can destroy the response before the client reads it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.linger.is_none() {
            std::task::ready!(Pin::new(&mut self.stream).poll_shutdown(cx))?;
            self.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        let this = &mut *self;
        let (deadline, drained) = this.linger.as_mut().expect("set above");
        let mut scratch = [0u8; 8192];
        loop {
            if *drained >= LINGER_BYTES || deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *drained += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks a request done when dropped (also when its handler is cancelled).
struct InService(Arc<Conn>);

impl Drop for InService {
    fn drop(&mut self) {
        self.0.set(Phase::Idle(Instant::now()));
    }
}

/// Serves `app` on `listener` until `shutdown`, with at most `max` connections.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    max: usize,
    timeouts: HttpTimeouts,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(max));
    let registry = Arc::new(Registry::default());
    let mut last_warning: Option<Instant> = None;
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: make room (the oldest connection waiting without a request), then take
                // the slot it gives back, or the first one freed.
                registry.evict_one();
                tokio::select! {
                    p = Arc::clone(&slots).acquire_owned() => p.expect("never closed"),
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors despite the reserve (something else holds many), or a
                // connection reset before it was accepted: make room and go on.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "could not accept a connection; closing an idle one to make room");
                    last_warning = Some(Instant::now());
                }
                registry.evict_one();
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            permit,
            Arc::clone(&registry),
            app.clone(),
            timeouts,
            shutdown.clone(),
        ));
    }
    drop(listener);
    // Every connection gives its slot back when it ends.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_LIMIT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {DRAIN_LIMIT:?} after the shutdown began; closing them"
        );
    }
    let evicted = registry.evicted.load(Ordering::Relaxed);
    if evicted > 0 {
        tracing::info!(
            evicted,
            "connections closed to make room while the connection limit was reached"
        );
    }
    Ok(())
}

async fn connection(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    registry: Arc<Registry>,
    app: axum::Router,
    timeouts: HttpTimeouts,
    shutdown: CancellationToken,
) {
    let (id, conn) = registry.add();
    let io = TokioIo::new(Watched {
        stream,
        conn: Arc::clone(&conn),
        linger: None,
    });
    let in_service = Arc::clone(&conn);
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            in_service.set(Phase::Busy);
            let done = InService(Arc::clone(&in_service));
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(axum::body::Body::new)).await;
                drop(done);
                response
            }
        });
    let mut http = hyper::server::conn::http1::Builder::new();
    // The head timeout is ours (above): hyper's would also cut idle keep-alive connections.
    http.timer(TokioTimer::new()).header_read_timeout(None);
    let served = http.serve_connection(io, service);
    tokio::pin!(served);
    let mut draining = false;
    loop {
        let deadline = conn.deadline(&timeouts);
        tokio::select! {
            _ = served.as_mut() => break,
            () = conn.close.cancelled() => break,
            () = conn.changed.notified() => {}
            () = sleep_until(deadline) => {
                if conn.deadline(&timeouts).is_some_and(|d| d <= Instant::now()) {
                    break;
                }
            }
            () = shutdown.cancelled(), if !draining => {
                served.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
    registry.remove(id);
    drop(permit);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_keeps_room_for_the_process() {
        assert_eq!(max_connections(256), 176);
        assert_eq!(max_connections(1024), 944);
        assert_eq!(max_connections(1 << 20), MAX_CONNECTIONS_CAP);
        assert_eq!(max_connections(50), MIN_CONNECTIONS);
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_waiting_connection_is_closed_for_room() {
        let registry = Registry::default();
        let (_, first) = registry.add();
        tokio::time::advance(Duration::from_secs(1)).await;
        let (_, busy) = registry.add();
        busy.set(Phase::Busy);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (_, young) = registry.add();
        assert!(registry.evict_one());
        assert!(first.close.is_cancelled());
        assert!(!busy.close.is_cancelled() && !young.close.is_cancelled());
        assert!(registry.evict_one());
        assert!(young.close.is_cancelled());
        assert!(
            !registry.evict_one(),
            "a connection handling a request is never closed"
        );
        assert!(!busy.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_phase() {
        let t = HttpTimeouts {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            idle: Duration::from_secs(75),
        };
        let registry = Registry::default();
        let (_, c) = registry.add();
        let opened = Instant::now();
        assert_eq!(c.deadline(&t), Some(opened + t.header));
        tokio::time::advance(Duration::from_secs(3)).await;
        c.received();
        assert_eq!(
            c.deadline(&t),
            Some(opened + t.header),
            "a slow first head counts from the open"
        );
        c.set(Phase::Busy);
        assert_eq!(c.deadline(&t), None);
        c.set(Phase::Idle(Instant::now()));
        let idle = Instant::now();
        assert_eq!(c.deadline(&t), Some(idle + t.idle));
        tokio::time::advance(Duration::from_secs(20)).await;
        c.received();
        assert_eq!(c.deadline(&t), Some(Instant::now() + t.header));
    }
}
