//! The S3-compatible side of [`Store`](super::Store): URL and settings resolution, error
//! reasons, and a multipart upload that keeps memory bounded.
//!
//! Invariants:
//! - An object appears only when it is whole. Below one part it is a single PutObject; from
//!   one part on it is a multipart upload, completed in [`S3Upload::finish`]. A writer that
//!   fails or is dropped unfinished aborts its upload (best effort; a bucket lifecycle rule
//!   "abort incomplete multipart uploads after a day" collects what a killed process leaves).
//! - Memory per writer: the part being filled plus the one being uploaded (which rust-s3
//!   copies once into its request body), about 3 × the part size: 24 MiB for the first 1000
//!   parts. rust-s3's own `put_object_stream` is not used: it keeps up to 10 parts in flight.
//! - Part numbers start at 1 and are consecutive. The part size doubles every 1000 parts, so
//!   the 10,000-part limit is only reached past 8 TiB (S3 caps an object at 5 TiB).
//! - A request that gets no answer fails after the request timeout; a download may take as
//!   long as it needs, but not go that long without receiving a byte.
//! - Secrets never appear in an error or in `Debug` output: reasons are the service's error
//!   code and message (never its whole reply), with the secret key masked should it appear.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use s3::Bucket;
use s3::Region;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::serde_types::Part;
use tokio::io::AsyncRead;
use tokio::task::JoinHandle;

use super::{ObjectInfo, S3Settings, StoreError};

/// Bytes per part at first; S3 wants at least 5 MiB in every part but the last.
pub(super) const PART_SIZE: usize = 8 << 20;

/// After this many parts the part size doubles.
const PARTS_PER_SIZE: u32 = 1000;

/// S3's limit on parts per upload.
const MAX_PARTS: u32 = 10_000;

/// Keys per ListObjectsV2 page: S3's maximum and default.
pub(super) const LIST_PAGE_SIZE: usize = 1000;

/// How long one request may go unanswered. A part of 8 MiB must go up within it, which needs
/// about 0.6 Mbit/s; parts that grow get proportionally more time.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

const CONTENT_TYPE: &str = "application/octet-stream";

/// A secret (secret key, session token): `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Secret(String);

impl Secret {
    pub(super) fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the secret replaced by `***`. A value too short to be
    /// a real key (under 8 characters) is left alone: masking it would mangle ordinary words.
    fn mask(&self, text: String) -> String {
        if self.0.len() < 8 || !text.contains(&self.0) {
            text
        } else {
            text.replace(&self.0, "***")
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `s3://bucket/prefix`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct S3Url {
    /// The bucket name.
    pub bucket: String,
    /// `""`, or the key prefix ending in `/` (`nightly/`, `a/b/`).
    pub prefix: String,
}

/// Splits what follows `s3://` into bucket and prefix. Empty path segments are dropped, so
/// `s3://b/`, `s3://b//x/` and `s3://b/x` name the same locations as one would expect.
pub(super) fn parse_url(rest: &str) -> Result<S3Url, String> {
    let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err("an S3 URL needs a bucket: s3://bucket or s3://bucket/prefix".to_owned());
    }
    if bucket.contains('@') {
        return Err(
            "credentials do not belong in the URL: set [backup] access_key and \
                    secret_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                .to_owned(),
        );
    }
    if bucket.contains(':') {
        return Err(
            "the URL names only the bucket: set the server in [backup] endpoint \
                    (or AWS_ENDPOINT_URL), e.g. endpoint = \"http://127.0.0.1:9000\""
                .to_owned(),
        );
    }
    if rest.contains(['?', '#']) {
        return Err(
            "query strings and fragments are not supported: set endpoint and \
                    region in [backup]"
                .to_owned(),
        );
    }
    if let Some(bad) = bucket
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "bucket name {bucket:?} contains {bad:?}; bucket names are letters, digits, '.' and '-'"
        ));
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let prefix = if segments.is_empty() {
        String::new()
    } else {
        format!("{}/", segments.join("/"))
    };
    Ok(S3Url {
        bucket: bucket.to_owned(),
        prefix,
    })
}

/// The URL for messages: a `user:password@` before the bucket is masked.
pub(super) fn redact_url(url: &str) -> String {
    let Some(rest) = url.strip_prefix("s3://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("s3://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// [`S3Settings`] with every fallback applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Resolved {
    /// `http(s)://host[:port]`, no trailing slash; none: AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// `[backup] path_style` when set; none: [`path_style`] decides.
    pub path_style: Option<bool>,
    pub access_key: String,
    pub secret_key: Secret,
    pub session_token: Option<Secret>,
}

/// Applies the fallbacks of [`S3Settings`], reading variables through `env` (the process
/// environment in production; a map in tests, which run in parallel threads). Each key falls
/// back on its own, so the access key may sit in the config file and the secret in the
/// environment. `AWS_SESSION_TOKEN` is used only with keys that both come from the
/// environment: temporary credentials come as a set.
pub(super) fn resolve(
    settings: &S3Settings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Resolved, String> {
    let set = |value: &Option<String>| value.clone().filter(|v| !v.trim().is_empty());
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());

    let endpoint = match set(&settings.endpoint).or_else(|| env("AWS_ENDPOINT_URL")) {
        None => None,
        Some(endpoint) => {
            let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
            let host = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            match host {
                Some(host) if !host.is_empty() && !host.contains('/') => Some(endpoint),
                _ => {
                    return Err(format!(
                        "endpoint {endpoint:?} must be http(s)://host[:port], e.g. \
                         https://<account>.r2.cloudflarestorage.com"
                    ));
                }
            }
        }
    };
    let region = set(&settings.region)
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".to_owned());

    let access_set = set(&settings.access_key);
    let secret_set = set(&settings.secret_key);
    let from_env = access_set.is_none() && secret_set.is_none();
    let access_key = access_set.or_else(|| env("AWS_ACCESS_KEY_ID"));
    let secret_key = secret_set.or_else(|| env("AWS_SECRET_ACCESS_KEY"));
    let (access_key, secret_key) = match (access_key, secret_key) {
        (Some(access), Some(secret)) => (access, Secret(secret)),
        (None, None) => {
            return Err(
                "no S3 credentials: set [backup] access_key and secret_key, or the \
                        environment variables AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    .to_owned(),
            );
        }
        (Some(_), None) => {
            return Err(
                "an S3 access key but no secret key: set [backup] secret_key or \
                        AWS_SECRET_ACCESS_KEY"
                    .to_owned(),
            );
        }
        (None, Some(_)) => {
            return Err(
                "an S3 secret key but no access key: set [backup] access_key or \
                        AWS_ACCESS_KEY_ID"
                    .to_owned(),
            );
        }
    };
    let session_token = if from_env {
        env("AWS_SESSION_TOKEN").map(Secret)
    } else {
        None
    };
    Ok(Resolved {
        endpoint,
        region,
        path_style: settings.path_style,
        access_key,
        secret_key,
        session_token,
    })
}

/// Whether requests name the bucket in the path (`endpoint/bucket/key`) rather than in the
/// host (`bucket.endpoint/key`): `configured` when set, else path style where a bucket cannot
/// be a subdomain, as the AWS SDKs decide: an endpoint that is an IP address (v4 or v6) or
/// `localhost`, or a bucket name that is not a valid DNS label (`my_bucket`, `Backups`).
pub(super) fn path_style(endpoint: Option<&str>, bucket: &str, configured: Option<bool>) -> bool {
    if let Some(configured) = configured {
        return configured;
    }
    let host = endpoint
        .and_then(|e| e.split_once("://").map(|(_, rest)| rest))
        .map(|authority| {
            let authority = authority.split('/').next().unwrap_or_default();
            match authority.strip_prefix('[') {
                // `[::1]:9000`
                Some(v6) => v6.split(']').next().unwrap_or_default(),
                None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
            }
        });
    let ip_or_localhost = host.is_some_and(|h| {
        h.parse::<std::net::IpAddr>().is_ok() || h.eq_ignore_ascii_case("localhost")
    });
    ip_or_localhost || !virtual_hostable(bucket)
}

/// A bucket name that can be a DNS label of its own: 3 to 63 lower-case letters, digits and
/// `-`, starting and ending with a letter or digit (dots would break TLS wildcards).
fn virtual_hostable(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !bucket.starts_with('-')
        && !bucket.ends_with('-')
}

/// The process environment, for [`resolve`].
pub(super) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A bucket and prefix, ready for requests.
#[derive(Clone)]
pub(super) struct S3Location {
    bucket: Arc<Bucket>,
    name: String,
    prefix: String,
    endpoint: Option<String>,
    secret: Secret,
    timeout: Duration,
    list_page_size: usize,
}

impl std::fmt::Debug for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Location")
            .field("location", &self.describe())
            .field("timeout", &self.timeout)
            .field("list_page_size", &self.list_page_size)
            .finish_non_exhaustive()
    }
}

impl S3Location {
    /// No request is made: a wrong key or an unreachable endpoint shows on first use.
    pub(super) fn new(url: S3Url, settings: Resolved) -> Result<S3Location, String> {
        let region = match &settings.endpoint {
            Some(endpoint) => Region::Custom {
                region: settings.region.clone(),
                endpoint: endpoint.clone(),
            },
            None => match settings.region.parse::<Region>() {
                Ok(Region::Custom { .. }) | Err(_) => {
                    // rust-s3 takes an unknown name for an endpoint: spell out AWS's.
                    Region::Custom {
                        region: settings.region.clone(),
                        endpoint: format!("https://s3.{}.amazonaws.com", settings.region),
                    }
                }
                Ok(region) => region,
            },
        };
        let credentials = Credentials::new(
            Some(&settings.access_key),
            Some(settings.secret_key.expose()),
            None,
            settings.session_token.as_ref().map(Secret::expose),
            None,
        )
        .map_err(|e| format!("S3 credentials: {e}"))?;
        let mut bucket = *Bucket::new(&url.bucket, region, credentials)
            .map_err(|e| format!("S3 client: {}", error_chain(&e)))?;
        if path_style(
            settings.endpoint.as_deref(),
            &url.bucket,
            settings.path_style,
        ) {
            bucket.set_path_style();
        }
        bucket.set_request_timeout(Some(REQUEST_TIMEOUT));
        Ok(S3Location {
            bucket: Arc::new(bucket),
            name: url.bucket,
            prefix: url.prefix,
            endpoint: settings.endpoint,
            secret: settings.secret_key,
            timeout: REQUEST_TIMEOUT,
            list_page_size: LIST_PAGE_SIZE,
        })
    }

    /// `s3://bucket/prefix`, with the endpoint when not AWS.
    pub(super) fn describe(&self) -> String {
        let mut out = format!("s3://{}", self.name);
        if !self.prefix.is_empty() {
            out.push('/');
            out.push_str(self.prefix.trim_end_matches('/'));
        }
        if let Some(endpoint) = &self.endpoint {
            out.push_str(" (endpoint ");
            out.push_str(endpoint);
            out.push(')');
        }
        out
    }

    pub(super) fn set_request_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        self.bucket = Arc::new(self.bucket_with_timeout(Some(timeout)));
    }

    pub(super) fn set_list_page_size(&mut self, size: usize) {
        self.list_page_size = size.clamp(1, LIST_PAGE_SIZE);
    }

    fn bucket_with_timeout(&self, timeout: Option<Duration>) -> Bucket {
        let mut bucket = (*self.bucket).clone();
        bucket.set_request_timeout(timeout);
        bucket
    }

    /// The object's key in the bucket.
    fn path(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn error(&self, action: &'static str, key: &str, reason: String) -> StoreError {
        StoreError::S3 {
            store: self.describe(),
            action,
            key: key.to_owned(),
            reason: self.secret.mask(reason),
        }
    }

    fn failed(&self, action: &'static str, key: &str, error: &S3Error) -> StoreError {
        self.error(action, key, reason(error, self.timeout))
    }

    fn not_found(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.describe(),
            key: key.to_owned(),
        }
    }

    pub(super) async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        match self.bucket.get_object(self.path(key)).await {
            Ok(data) => Ok(data.into_bytes()),
            Err(e) if is_missing_key(&e) => Err(self.not_found(key)),
            Err(e) => Err(self.failed("read", key, &e)),
        }
    }

    pub(super) async fn reader(
        &self,
        key: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StoreError> {
        // rust-s3's request timeout also bounds reading the body, which would cut off a long
        // download: the body is bounded by an idle timeout instead.
        let bucket = self.bucket_with_timeout(None);
        let path = self.path(key);
        let response = tokio::time::timeout(self.timeout, bucket.get_object_stream(&path)).await;
        let response = match response {
            Ok(Ok(response)) => response,
            Ok(Err(e)) if is_missing_key(&e) => return Err(self.not_found(key)),
            Ok(Err(e)) => return Err(self.failed("read", key, &e)),
            Err(_) => return Err(self.error("read", key, no_answer(self.timeout))),
        };
        let idle = self.timeout;
        let context = format!("{}: read {key}", self.describe());
        let secret = self.secret.clone();
        let chunks = futures_util::stream::unfold(Some(response.bytes), move |stream| {
            let context = context.clone();
            let secret = secret.clone();
            async move {
                let mut stream = stream?;
                let failure = match tokio::time::timeout(idle, stream.next()).await {
                    Ok(None) => return None,
                    Ok(Some(Ok(chunk))) => return Some((Ok(chunk), Some(stream))),
                    Ok(Some(Err(e))) => std::io::Error::other(format!(
                        "{context}: {}",
                        secret.mask(reason(&e, idle))
                    )),
                    Err(_) => std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{context}: no data for {idle:?}"),
                    ),
                };
                Some((Err(failure), None))
            }
        });
        Ok(Box::new(tokio_util::io::StreamReader::new(Box::pin(
            chunks,
        ))))
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let full = self.path(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let (page, _) = self
                .bucket
                .list_page(
                    full.clone(),
                    None,
                    token.clone(),
                    None,
                    Some(self.list_page_size),
                )
                .await
                .map_err(|e| self.failed("list", prefix, &e))?;
            for object in page.contents {
                // "Folders" made by consoles are empty objects named `dir/`, not backups.
                if object.key.ends_with('/') {
                    continue;
                }
                if let Some(key) = object.key.strip_prefix(&self.prefix) {
                    out.push(ObjectInfo {
                        key: key.to_owned(),
                        size: object.size,
                    });
                }
            }
            if !page.is_truncated {
                break;
            }
            match page.next_continuation_token {
                Some(next) if token.as_ref() != Some(&next) => token = Some(next),
                _ => {
                    return Err(self.error(
                        "list",
                        prefix,
                        "the listing is truncated but gives no new continuation token".to_owned(),
                    ));
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.bucket.delete_object(self.path(key)).await {
            Ok(_) => Ok(()),
            Err(e) if is_missing_key(&e) => Ok(()),
            Err(e) => Err(self.failed("delete", key, &e)),
        }
    }

    pub(super) fn upload(&self, key: &str) -> S3Upload {
        S3Upload {
            location: self.clone(),
            part_bucket: self.bucket.clone(),
            key: key.to_owned(),
            path: self.path(key),
            buf: Vec::new(),
            part_size: PART_SIZE,
            upload_id: None,
            next_part: 1,
            parts: Vec::new(),
            in_flight: None,
            failed: false,
            done: false,
        }
    }
}

/// One object being written: see the module docs.
pub(super) struct S3Upload {
    location: S3Location,
    /// The bucket with a timeout fitting the current part size.
    part_bucket: Arc<Bucket>,
    key: String,
    path: String,
    /// The part being filled.
    buf: Vec<u8>,
    part_size: usize,
    /// Set once the first part is full.
    upload_id: Option<String>,
    /// The number the next part sent gets.
    next_part: u32,
    /// Parts uploaded, in order.
    parts: Vec<Part>,
    /// The part being uploaded; awaited before the next one is sent.
    in_flight: Option<JoinHandle<Result<Part, S3Error>>>,
    /// A request failed and the upload was given up.
    failed: bool,
    /// The object is complete.
    done: bool,
}

impl S3Upload {
    pub(super) async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        self.check_usable("write")?;
        while !data.is_empty() {
            // A full part is sent only when more data comes, so an object of exactly one part
            // is still a single PutObject.
            if self.buf.len() >= self.part_size {
                self.send_part().await?;
            }
            let n = (self.part_size - self.buf.len()).min(data.len());
            let needed = self.buf.len() + n;
            if needed > self.buf.capacity() {
                // Grow by doubling, but never past one part: a manifest stays small, and a
                // part never holds twice its size.
                let target = (self.buf.capacity() * 2)
                    .max(needed)
                    .max(64 * 1024)
                    .min(self.part_size);
                self.buf.reserve_exact(target - self.buf.len());
            }
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        Ok(())
    }

    pub(super) async fn finish(&mut self) -> Result<(), StoreError> {
        self.check_usable("finish")?;
        if self.upload_id.is_none() {
            let location = &self.location;
            return match location.bucket.put_object(&self.path, &self.buf).await {
                Ok(_) => {
                    self.done = true;
                    self.buf = Vec::new();
                    Ok(())
                }
                Err(e) => {
                    self.failed = true;
                    Err(location.failed("write", &self.key, &e))
                }
            };
        }
        if !self.buf.is_empty() {
            self.send_part().await?;
        }
        self.await_in_flight().await?;
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let completed = self
            .location
            .bucket
            .complete_multipart_upload(&self.path, &upload_id, self.parts.clone())
            .await;
        match completed {
            Ok(_) => {
                self.done = true;
                self.upload_id = None;
                Ok(())
            }
            Err(e) => Err(self.give_up("complete", &e).await),
        }
    }

    fn check_usable(&self, action: &'static str) -> Result<(), StoreError> {
        if self.failed || self.done {
            let reason = if self.failed {
                "an earlier request of this upload failed"
            } else {
                "the object is already complete"
            };
            return Err(self.location.error(action, &self.key, reason.to_owned()));
        }
        Ok(())
    }

    /// Sends the buffered part: starts the upload if this is the first, waits for the part
    /// before, then uploads this one in the background while the next fills. State changes
    /// only after each await succeeds, so a cancelled write loses no part.
    async fn send_part(&mut self) -> Result<(), StoreError> {
        if self.next_part > MAX_PARTS {
            self.failed = true;
            self.abort().await;
            return Err(self.location.error(
                "write",
                &self.key,
                format!("too large for one S3 object ({MAX_PARTS} parts)"),
            ));
        }
        if self.upload_id.is_none() {
            let initiated = self
                .location
                .bucket
                .initiate_multipart_upload(&self.path, CONTENT_TYPE)
                .await;
            match initiated {
                Ok(response) => self.upload_id = Some(response.upload_id),
                Err(e) => {
                    self.failed = true;
                    return Err(self.location.failed("start uploading", &self.key, &e));
                }
            }
        }
        self.await_in_flight().await?;

        let chunk = std::mem::take(&mut self.buf);
        let bucket = self.part_bucket.clone();
        let path = self.path.clone();
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let number = self.next_part;
        self.in_flight = Some(tokio::spawn(async move {
            bucket
                .put_multipart_chunk(chunk, &path, number, &upload_id, CONTENT_TYPE)
                .await
        }));
        self.next_part += 1;
        if number % PARTS_PER_SIZE == 0 {
            self.part_size *= 2;
            let scale = u32::try_from(self.part_size / PART_SIZE).unwrap_or(u32::MAX);
            let timeout = self.location.timeout.saturating_mul(scale);
            self.part_bucket = Arc::new(self.location.bucket_with_timeout(Some(timeout)));
        }
        Ok(())
    }

    async fn await_in_flight(&mut self) -> Result<(), StoreError> {
        let Some(handle) = self.in_flight.as_mut() else {
            return Ok(());
        };
        let result = handle.await;
        self.in_flight = None;
        match result {
            Ok(Ok(part)) => {
                self.parts.push(part);
                Ok(())
            }
            Ok(Err(e)) => Err(self.give_up("upload part of", &e).await),
            Err(join) => {
                self.failed = true;
                let reason = format!("the part upload task ended: {join}");
                self.abort().await;
                Err(self.location.error("upload part of", &self.key, reason))
            }
        }
    }

    /// Marks the upload failed, aborts it, and returns the error for `e`.
    async fn give_up(&mut self, action: &'static str, e: &S3Error) -> StoreError {
        self.failed = true;
        self.abort().await;
        self.location.failed(action, &self.key, e)
    }

    /// Aborts the multipart upload, best effort: the error that led here is what matters.
    async fn abort(&mut self) {
        if let Some(handle) = self.in_flight.take() {
            handle.abort();
            let _ = handle.await;
        }
        if let Some(upload_id) = &self.upload_id {
            if let Err(error) = self
                .location
                .bucket
                .abort_upload(&self.path, upload_id)
                .await
            {
                tracing::warn!(
                    store = %self.location.describe(),
                    key = %self.key,
                    reason = %self.location.secret.mask(reason(&error, self.location.timeout)),
                    "could not abort a multipart upload; a lifecycle rule will have to remove its parts"
                );
            }
            self.upload_id = None;
        }
    }

    /// Called when the writer is dropped: aborts an upload that was not completed, in the
    /// background, if a runtime is there to run it.
    pub(super) fn abandon(&mut self) {
        let in_flight = self.in_flight.take();
        if let Some(handle) = &in_flight {
            handle.abort();
        }
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bucket = self.location.bucket.clone();
        let path = self.path.clone();
        runtime.spawn(async move {
            // The part upload must stop before the abort, or it could land after it.
            if let Some(handle) = in_flight {
                let _ = handle.await;
            }
            let _ = bucket.abort_upload(&path, &upload_id).await;
        });
    }
}

/// A 404 about the object (not the bucket).
fn is_missing_key(error: &S3Error) -> bool {
    match error {
        S3Error::HttpFailWithBody(404, body) => {
            xml_field(body, "Code").is_none_or(|code| code != "NoSuchBucket")
        }
        _ => false,
    }
}

fn no_answer(timeout: Duration) -> String {
    format!("no answer within {timeout:?}")
}

/// Why a request failed, in one line without credentials: the service's error code and
/// message, or the network error with its causes.
pub(super) fn reason(error: &S3Error, timeout: Duration) -> String {
    match error {
        S3Error::HttpFailWithBody(status, body) => http_reason(*status, body),
        S3Error::Reqwest(e) if e.is_timeout() => no_answer(timeout),
        S3Error::Reqwest(e) => error_chain(e),
        other => error_chain(other),
    }
}

/// `HTTP 403 SignatureDoesNotMatch: <message> (<hint>)`, from an S3 error reply.
pub(super) fn http_reason(status: u16, body: &str) -> String {
    let mut out = format!("HTTP {status}");
    match xml_field(body, "Code") {
        Some(code) => {
            out.push(' ');
            out.push_str(code);
            if let Some(message) = xml_field(body, "Message").filter(|m| !m.is_empty()) {
                out.push_str(": ");
                out.push_str(message);
            }
            let hint = match code {
                "SignatureDoesNotMatch" => Some("check the secret key"),
                "InvalidAccessKeyId" => Some("check the access key"),
                "AccessDenied" => Some("check the key's permissions on the bucket"),
                "NoSuchBucket" => Some("check the bucket name and the endpoint"),
                "PermanentRedirect" | "AuthorizationHeaderMalformed" => {
                    Some("check the region ([backup] region or AWS_REGION)")
                }
                _ => None,
            };
            if let Some(hint) = hint {
                out.push_str(" (");
                out.push_str(hint);
                out.push(')');
            }
        }
        None => {
            // Not an S3 error document (a proxy's page, say): a short excerpt.
            let text: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
            if !text.is_empty() {
                out.push_str(": ");
                out.extend(text.chars().take(200));
            }
        }
    }
    out
}

/// The text of the first `<name>…</name>` in an XML document, if any.
fn xml_field<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(xml[start..end].trim())
}

/// An error and its causes, `: `-separated, each cause once.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn url(rest: &str) -> S3Url {
        parse_url(rest).unwrap_or_else(|e| panic!("{rest}: {e}"))
    }

    #[test]
    fn urls_split_into_bucket_and_a_slash_terminated_prefix() {
        let cases = [
            ("backups", "backups", ""),
            ("backups/", "backups", ""),
            ("backups/nightly", "backups", "nightly/"),
            ("backups/nightly/", "backups", "nightly/"),
            ("backups//a//b/", "backups", "a/b/"),
            ("my.bucket-1/a/b/c", "my.bucket-1", "a/b/c/"),
        ];
        for (rest, bucket, prefix) in cases {
            let expected = S3Url {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            };
            assert_eq!(url(rest), expected, "s3://{rest}");
        }
    }

    #[test]
    fn bad_urls_say_what_to_do_instead() {
        let cases = [
            ("", "needs a bucket"),
            ("/prefix", "needs a bucket"),
            (
                "key:secret@bucket/x",
                "credentials do not belong in the URL",
            ),
            ("127.0.0.1:9000/bucket", "[backup] endpoint"),
            ("bucket/x?region=eu", "query strings"),
            ("bu cket/x", "bucket name"),
        ];
        for (rest, expected) in cases {
            match parse_url(rest) {
                Ok(parsed) => panic!("s3://{rest} parsed as {parsed:?}"),
                Err(reason) => assert!(reason.contains(expected), "s3://{rest}: {reason}"),
            }
        }
    }

    #[test]
    fn credentials_in_a_url_are_masked_for_messages() {
        assert_eq!(
            redact_url("s3://AKIA:hunter2@bucket/x"),
            "s3://***@bucket/x"
        );
        assert_eq!(redact_url("s3://bucket/a@b"), "s3://bucket/a@b");
        assert_eq!(redact_url("ftp://x"), "ftp://x");
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn settings_win_over_the_environment() {
        let settings = S3Settings {
            endpoint: Some("http://127.0.0.1:9000/".to_owned()),
            region: Some("auto".to_owned()),
            path_style: Some(true),
            access_key: Some("from-config".to_owned()),
            secret_key: Some("config-secret".to_owned()),
        };
        let resolved = resolve(
            &settings,
            env(&[
                ("AWS_ENDPOINT_URL", "https://elsewhere"),
                ("AWS_REGION", "eu-west-1"),
                ("AWS_ACCESS_KEY_ID", "from-env"),
                ("AWS_SECRET_ACCESS_KEY", "env-secret"),
                ("AWS_SESSION_TOKEN", "token"),
            ]),
        )
        .unwrap();
        assert_eq!(
            resolved,
            Resolved {
                endpoint: Some("http://127.0.0.1:9000".to_owned()),
                region: "auto".to_owned(),
                path_style: Some(true),
                access_key: "from-config".to_owned(),
                secret_key: Secret("config-secret".to_owned()),
                // The token belongs to the environment's keys, not the config's.
                session_token: None,
            }
        );
    }

    #[test]
    fn the_environment_fills_in_what_settings_leave_out() {
        let resolved = resolve(
            &S3Settings::default(),
            env(&[
                ("AWS_ENDPOINT_URL", "https://acct.r2.cloudflarestorage.com"),
                ("AWS_DEFAULT_REGION", "eu-central-1"),
                ("AWS_ACCESS_KEY_ID", "from-env"),
                ("AWS_SECRET_ACCESS_KEY", "env-secret"),
                ("AWS_SESSION_TOKEN", "token"),
            ]),
        )
        .unwrap();
        assert_eq!(
            resolved.endpoint.as_deref(),
            Some("https://acct.r2.cloudflarestorage.com")
        );
        assert_eq!(resolved.region, "eu-central-1");
        assert_eq!(resolved.access_key, "from-env");
        assert_eq!(resolved.secret_key.expose(), "env-secret");
        assert_eq!(
            resolved.session_token.as_ref().map(Secret::expose),
            Some("token")
        );

        // AWS_REGION wins over AWS_DEFAULT_REGION; nothing at all means us-east-1.
        let both = env(&[
            ("AWS_REGION", "ap-south-1"),
            ("AWS_DEFAULT_REGION", "eu-central-1"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ]);
        assert_eq!(
            resolve(&S3Settings::default(), both).unwrap().region,
            "ap-south-1"
        );
        let bare = env(&[("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "s")]);
        let resolved = resolve(&S3Settings::default(), bare).unwrap();
        assert_eq!(resolved.region, "us-east-1");
        assert_eq!(resolved.endpoint, None);
    }

    #[test]
    fn each_key_falls_back_on_its_own() {
        let settings = S3Settings {
            access_key: Some("in-config".to_owned()),
            ..S3Settings::default()
        };
        let resolved = resolve(&settings, env(&[("AWS_SECRET_ACCESS_KEY", "in-env")])).unwrap();
        assert_eq!(resolved.access_key, "in-config");
        assert_eq!(resolved.secret_key.expose(), "in-env");
    }

    #[test]
    fn missing_credentials_name_the_keys_to_set() {
        let none = resolve(&S3Settings::default(), env(&[])).unwrap_err();
        for name in [
            "[backup] access_key",
            "secret_key",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(none.contains(name), "{none}");
        }
        // Empty values count as unset.
        let empty = env(&[("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "")]);
        let half = resolve(&S3Settings::default(), empty).unwrap_err();
        assert!(half.contains("AWS_SECRET_ACCESS_KEY"), "{half}");
        let settings = S3Settings {
            secret_key: Some("s".to_owned()),
            ..S3Settings::default()
        };
        let other_half = resolve(&settings, env(&[])).unwrap_err();
        assert!(other_half.contains("access_key"), "{other_half}");
    }

    #[test]
    fn path_style_is_automatic_for_ips_localhost_and_odd_bucket_names() {
        let auto = |endpoint: Option<&str>, bucket: &str| path_style(endpoint, bucket, None);
        for endpoint in [
            "http://127.0.0.1:9000",
            "http://10.0.0.5",
            "http://[::1]:9000",
            "https://[2001:db8::7]",
            "http://localhost:9000",
            "http://LOCALHOST",
        ] {
            assert!(auto(Some(endpoint), "backups"), "{endpoint}");
        }
        for endpoint in [
            "https://acct.r2.cloudflarestorage.com",
            "https://s3.us-west-004.backblazeb2.com",
            "http://minio:9000",
            "http://127.0.0.1.nip.io:9000",
        ] {
            assert!(!auto(Some(endpoint), "backups"), "{endpoint}");
        }
        assert!(!auto(None, "backups"), "AWS itself: virtual-hosted");
        for bucket in ["my_bucket", "Backups", "a.b.c", "ab", "-x-"] {
            assert!(auto(None, bucket), "{bucket}");
        }
        // path_style overrides in both directions.
        assert!(!path_style(
            Some("http://127.0.0.1:9000"),
            "backups",
            Some(false)
        ));
        assert!(path_style(
            Some("https://s3.example.com"),
            "backups",
            Some(true)
        ));
    }

    #[test]
    fn an_endpoint_needs_a_scheme() {
        let settings = S3Settings {
            endpoint: Some("minio:9000".to_owned()),
            access_key: Some("a".to_owned()),
            secret_key: Some("s".to_owned()),
            ..S3Settings::default()
        };
        let reason = resolve(&settings, env(&[])).unwrap_err();
        assert!(reason.contains("http(s)://"), "{reason}");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let settings = S3Settings {
            access_key: Some("AKIAEXAMPLE".to_owned()),
            secret_key: Some("very-secret-key".to_owned()),
            ..S3Settings::default()
        };
        let resolved = resolve(&settings, env(&[("AWS_SESSION_TOKEN", "tok")])).unwrap();
        let location = S3Location::new(url("b/p"), resolved.clone()).unwrap();
        for shown in [
            format!("{settings:?}"),
            format!("{resolved:?}"),
            format!("{location:?}"),
        ] {
            assert!(!shown.contains("very-secret-key"), "{shown}");
        }
    }

    #[test]
    fn an_aws_location_is_described_without_an_endpoint() {
        let resolved = resolve(
            &S3Settings::default(),
            env(&[("AWS_ACCESS_KEY_ID", "a"), ("AWS_SECRET_ACCESS_KEY", "s")]),
        )
        .unwrap();
        let location = S3Location::new(url("backups/nightly/"), resolved.clone()).unwrap();
        assert_eq!(location.describe(), "s3://backups/nightly");
        assert_eq!(location.bucket.host(), "backups.s3.amazonaws.com");
        // A region rust-s3 knows, and one it does not (a newer one) on AWS's usual host.
        let mut known = resolved.clone();
        known.region = "eu-west-3".to_owned();
        let location = S3Location::new(url("backups"), known).unwrap();
        assert_eq!(location.describe(), "s3://backups");
        assert!(
            location.bucket.host().contains("eu-west-3"),
            "{}",
            location.bucket.host()
        );
        let mut newer = resolved;
        newer.region = "xx-future-1".to_owned();
        let location = S3Location::new(url("backups"), newer).unwrap();
        assert_eq!(
            location.bucket.host(),
            "backups.s3.xx-future-1.amazonaws.com"
        );
        assert_eq!(location.bucket.region().to_string(), "xx-future-1");
    }

    #[test]
    fn http_errors_become_one_line_with_the_code_and_a_hint() {
        let body = "<?xml version=\"1.0\"?>\n<Error><Code>SignatureDoesNotMatch</Code>\
                    <Message>The request signature we calculated does not match.</Message>\
                    <StringToSign>AWS4-HMAC-SHA256 ...</StringToSign></Error>";
        assert_eq!(
            http_reason(403, body),
            "HTTP 403 SignatureDoesNotMatch: The request signature we calculated does not \
             match. (check the secret key)"
        );
        assert_eq!(http_reason(502, ""), "HTTP 502");
        assert_eq!(
            http_reason(502, "<html>\n  Bad   gateway\n</html>"),
            "HTTP 502: <html> Bad gateway </html>"
        );
        assert!(http_reason(500, &"x".repeat(1000)).len() < 220);
    }

    #[test]
    fn only_a_missing_key_is_not_found() {
        let missing = |body: &str| is_missing_key(&S3Error::HttpFailWithBody(404, body.into()));
        assert!(missing("<Error><Code>NoSuchKey</Code></Error>"));
        assert!(missing(""));
        assert!(!missing("<Error><Code>NoSuchBucket</Code></Error>"));
        assert!(!is_missing_key(&S3Error::HttpFailWithBody(
            403,
            "<Error><Code>AccessDenied</Code></Error>".into()
        )));
    }

    #[test]
    fn a_secret_is_masked_wherever_it_appears() {
        let secret = Secret("s3cr3t-key".to_owned());
        assert_eq!(
            secret.mask("a s3cr3t-key b s3cr3t-key".to_owned()),
            "a *** b ***"
        );
        assert_eq!(format!("{secret:?}"), "***");
        let short = Secret("s".to_owned());
        assert_eq!(short.mask("sessions".to_owned()), "sessions");
    }
}
