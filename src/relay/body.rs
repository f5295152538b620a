//! Reading request bodies: bounded in size, in time, and for the public webhook in memory.
//!
//! The relay is on the public internet. A handler reads its body with [`read`] only after
//! whatever can be checked from the headers passed (credentials, the signature header's
//! form, the declared length), and:
//! - never more than its limit: a declared `Content-Length` over it is refused before
//!   reading, a body that grows past it is refused as soon as it does;
//! - never longer than the body timeout: a client trickling its body gives the request up;
//! - for the webhook, only within a [`Budget`] of bytes held by all bodies being read at once:
//!   a request reserves its declared length (or the limit, when it declares none) before
//!   reading and keeps the reservation while the bytes live, so however many unsigned or
//!   forged bodies arrive together, the relay holds at most the budget of them; the others
//!   wait their turn (within the body timeout) and are read as memory frees up.
//!
//! Each chunk is handed to a callback as it arrives (the webhook feeds its signature check),
//! and the bytes are gathered into one buffer sized from the declared length.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Makes the allocator give every large buffer (a body, a batch) back to the system when it
/// is freed, instead of keeping it for reuse: glibc otherwise raises its mmap threshold to
/// the largest block freed so far (up to 32 MiB), so after one burst of 4 MiB bodies the next
/// ones come from the heap and stay in the relay's RSS. A fixed 1 MiB threshold keeps every
/// body above it in its own mapping. Called once when the relay starts.
pub fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; called before the workers start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
}

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Longer than the route accepts.
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    /// Not all of it arrived within the body timeout.
    #[error("the body did not arrive within {0:?}")]
    Timeout(Duration),
    /// The relay is reading as many bodies as its memory budget allows; try again.
    #[error("too many large requests at once")]
    Busy,
    /// The client broke off.
    #[error("the body could not be read")]
    Broken(#[source] axum::Error),
}

/// The declared `Content-Length`, if any (unparsable counts as none: the limit still holds).
pub fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Bytes that bodies being read may hold together (granted in KiB).
#[derive(Debug, Clone)]
pub struct Budget {
    kib: Arc<Semaphore>,
    total_kib: u32,
}

/// Bytes of a [`Budget`] held by one body; given back when dropped.
#[derive(Debug)]
pub struct Reserved(#[allow(dead_code)] OwnedSemaphorePermit);

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Budget {
        let total_kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .max(1);
        Budget {
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Reserves `bytes` (at most the whole budget), waiting until `deadline` for them.
    pub async fn reserve(&self, bytes: usize, deadline: Instant) -> Result<Reserved, BodyError> {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_kib);
        match tokio::time::timeout_at(deadline, Arc::clone(&self.kib).acquire_many_owned(kib)).await
        {
            Ok(Ok(permit)) => Ok(Reserved(permit)),
            _ => Err(BodyError::Busy),
        }
    }

    /// KiB not reserved right now.
    pub fn available_kib(&self) -> usize {
        self.kib.available_permits()
    }
}

/// Reads `body` whole: at most `limit` bytes, before `deadline`, each chunk handed to
/// `each` as it arrives. `declared` sizes the buffer (within the limit).
pub async fn read(
    body: Body,
    limit: usize,
    declared: Option<usize>,
    deadline: Instant,
    mut each: impl FnMut(&[u8]),
) -> Result<bytes::Bytes, BodyError> {
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge(limit));
    }
    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut body = body;
    let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout(timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                // axum reports a body over a layer's limit as an error too.
                return Err(BodyError::Broken(e));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        each(&data);
        buf.extend_from_slice(&data);
    }
    Ok(buf.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(parts: Vec<&'static [u8]>) -> Body {
        let stream = futures_util::stream::iter(
            parts
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(bytes::Bytes::from_static(p))),
        );
        Body::from_stream(stream)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn chunks_are_seen_and_gathered() {
        let mut seen = Vec::new();
        let got = read(chunked(vec![b"ab", b"cd", b"e"]), 10, None, soon(), |c| {
            seen.push(c.to_vec())
        })
        .await
        .unwrap();
        assert_eq!(&got[..], b"abcde");
        assert_eq!(seen.len(), 3);
    }

    #[tokio::test]
    async fn the_limit_holds_declared_or_not() {
        let e = read(chunked(vec![b"abc"]), 2, Some(3), soon(), |_| {}).await;
        assert!(matches!(e, Err(BodyError::TooLarge(2))));
        let mut fed = 0;
        let e = read(chunked(vec![b"ab", b"cd"]), 3, None, soon(), |c| {
            fed += c.len()
        })
        .await;
        assert!(matches!(e, Err(BodyError::TooLarge(3))));
        assert_eq!(fed, 2, "nothing past the limit is looked at");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_times_out() {
        let stream = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
        let e = read(
            Body::from_stream(stream),
            10,
            None,
            Instant::now() + Duration::from_secs(2),
            |_| {},
        )
        .await;
        assert!(matches!(e, Err(BodyError::Timeout(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_shared_and_given_back() {
        let budget = Budget::new(8 * 1024);
        let a = budget.reserve(6 * 1024, soon()).await.unwrap();
        assert_eq!(budget.available_kib(), 2);
        let b = budget
            .reserve(4 * 1024, Instant::now() + Duration::from_secs(1))
            .await;
        assert!(
            matches!(b, Err(BodyError::Busy)),
            "over the budget: waits, then gives up"
        );
        drop(a);
        let whole = budget.reserve(100 * 1024 * 1024, soon()).await.unwrap();
        assert_eq!(
            budget.available_kib(),
            0,
            "asking for more takes the whole budget"
        );
        drop(whole);
        assert_eq!(budget.available_kib(), 8);
    }
}
