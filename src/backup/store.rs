//! Where backups live: a folder (`file:///dir`) or an S3-compatible bucket
//! (`s3://bucket/prefix`: AWS S3, Cloudflare R2, Backblaze B2, Railway buckets, MinIO).
//!
//! Objects are named by keys relative to the location (`20261129T060000Z/manifest.json`).
//! Large objects are written through an [`ObjectWriter`], in memory bounded by a few parts
//! (S3 multipart upload) no matter how large the object; an object appears only when its
//! writer finishes (a file is renamed into place, a multipart upload completed), so a killed
//! backup leaves no half object under its final name.
//!
//! This file is the API and the folder backend; `store/s3.rs` is the S3 side (settings and
//! their environment fallbacks, the multipart upload, error reasons without secrets).

mod s3;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt};

/// How to reach an S3-compatible store, beyond its URL: `[backup]` keys, else the usual
/// `AWS_*` environment variables.
#[derive(Clone, Default)]
pub struct S3Settings {
    /// Custom endpoint (`https://<account>.r2.cloudflarestorage.com`, `http://127.0.0.1:9000`);
    /// none: AWS.
    pub endpoint: Option<String>,
    /// Region (`auto` for R2); default `AWS_REGION`, `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`), which MinIO and most self-hosted stores need;
    /// none: path style for an endpoint that is an IP address or `localhost` (and for bucket
    /// names that cannot be a host name), virtual-hosted otherwise, as the AWS SDKs do.
    pub path_style: Option<bool>,
    /// Access key id; default `AWS_ACCESS_KEY_ID`.
    pub access_key: Option<String>,
    /// Secret key; default `AWS_SECRET_ACCESS_KEY`. Never shown.
    pub secret_key: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key", &self.access_key)
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A store operation that failed; the message names the store (never a secret) and the key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is not `file:///dir` or `s3://bucket[/prefix]`.
    #[error("backup location {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The object does not exist.
    #[error("{store}: {key} does not exist")]
    NotFound {
        /// The store, as [`Store::describe`] shows it.
        store: String,
        /// The key.
        key: String,
    },
    /// Reading or writing a local file failed.
    #[error("{store}: {action}{}: {source}", with_space(.key))]
    Io {
        /// The store.
        store: String,
        /// What was being done.
        action: &'static str,
        /// The key.
        key: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The S3 settings are incomplete or malformed (no credentials, a bad endpoint).
    #[error("{store}: {reason}")]
    Settings {
        /// The store.
        store: String,
        /// What is missing or wrong, and which setting or variable to fix.
        reason: String,
    },
    /// The S3 service refused or could not be reached.
    #[error("{store}: {action}{}: {reason}", with_space(.key))]
    S3 {
        /// The store.
        store: String,
        /// What was being done.
        action: &'static str,
        /// The key.
        key: String,
        /// The cause, without credentials.
        reason: String,
    },
}

/// `" key"`, or nothing for an empty key (a listing of everything).
fn with_space(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!(" {key}")
    }
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key, relative to the location.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What a finished [`ObjectWriter`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes stored.
    pub size: u64,
    /// SHA-256 of the bytes stored, lower-case hex.
    pub sha256: String,
}

/// A backup location.
#[derive(Debug, Clone)]
pub struct Store {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    File { root: PathBuf },
    S3(s3::S3Location),
}

impl Store {
    /// Opens `file:///dir` (created if missing) or `s3://bucket[/prefix]`. Opening an S3
    /// location makes no request: wrong keys or an unreachable endpoint show on first use.
    pub async fn open(url: &str, s3: &S3Settings) -> Result<Store, StoreError> {
        Self::open_with_env(url, s3, s3::process_env).await
    }

    /// [`Store::open`] reading `AWS_*` variables through `env` instead of the process
    /// environment: for callers that hold their own environment, and for tests, which run in
    /// parallel threads and must not change the process's.
    pub async fn open_with_env(
        url: &str,
        s3: &S3Settings,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Store, StoreError> {
        let bad = |reason: &str| StoreError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a file URL needs an absolute path: file:///var/backups/bite-sync",
                ));
            }
            let root = PathBuf::from(path);
            tokio::fs::create_dir_all(&root)
                .await
                .map_err(|source| StoreError::Io {
                    store: url.to_owned(),
                    action: "cannot create the folder",
                    key: path.to_owned(),
                    source,
                })?;
            return Ok(Store {
                kind: Kind::File { root },
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let bad = |reason: String| StoreError::BadUrl {
                url: s3::redact_url(url),
                reason,
            };
            let parsed = s3::parse_url(rest).map_err(bad)?;
            let shown = format!("s3://{}{}", parsed.bucket, {
                let prefix = parsed.prefix.trim_end_matches('/');
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!("/{prefix}")
                }
            });
            let settings = s3::resolve(s3, env).map_err(|reason| StoreError::Settings {
                store: shown.clone(),
                reason,
            })?;
            let location =
                s3::S3Location::new(parsed, settings).map_err(|reason| StoreError::Settings {
                    store: shown,
                    reason,
                })?;
            return Ok(Store {
                kind: Kind::S3(location),
            });
        }
        Err(bad(
            "expected file:///dir or s3://bucket/prefix (any S3-compatible store)",
        ))
    }

    /// The location as a URL, for messages (no credentials): `file:///var/backups`,
    /// `s3://bucket/prefix`, `s3://bucket/prefix (endpoint http://127.0.0.1:9000)`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::File { root } => format!("file://{}", root.display()),
            Kind::S3(s3) => s3.describe(),
        }
    }

    /// How long one S3 request may go unanswered, and a download without receiving a byte
    /// (default 2 minutes; parts that grow past 8 MiB get proportionally more). A folder
    /// ignores it.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Store {
        if let Kind::S3(s3) = &mut self.kind {
            s3.set_request_timeout(timeout);
        }
        self
    }

    /// Keys per S3 listing request, 1 to 1000 (the default, and S3's maximum); for stores
    /// that want smaller pages. A folder ignores it.
    pub fn with_list_page_size(mut self, size: usize) -> Store {
        if let Kind::S3(s3) = &mut self.kind {
            s3.set_list_page_size(size);
        }
        self
    }

    /// Starts writing `key`; nothing is visible under it until [`ObjectWriter::finish`].
    pub async fn writer(&self, key: &str) -> Result<ObjectWriter, StoreError> {
        match &self.kind {
            Kind::File { root } => {
                let path = file_path(root, key);
                let partial = partial_path(&path);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(|e| self.io("create", key, e))?;
                }
                let file = tokio::fs::File::create(&partial)
                    .await
                    .map_err(|e| self.io("create", key, e))?;
                Ok(ObjectWriter {
                    store: self.describe(),
                    key: key.to_owned(),
                    sha: Sha256::new(),
                    size: 0,
                    sink: Sink::File {
                        file: tokio::io::BufWriter::with_capacity(256 * 1024, file),
                        partial,
                        path,
                    },
                })
            }
            Kind::S3(s3) => Ok(ObjectWriter {
                store: self.describe(),
                key: key.to_owned(),
                sha: Sha256::new(),
                size: 0,
                sink: Sink::S3(Box::new(s3.upload(key))),
            }),
        }
    }

    /// Writes a small object whole (the manifest).
    pub async fn put(&self, key: &str, data: &[u8]) -> Result<Written, StoreError> {
        let mut w = self.writer(key).await?;
        w.write(data).await?;
        w.finish().await
    }

    /// Reads a small object whole.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        match &self.kind {
            Kind::File { root } => match tokio::fs::read(file_path(root, key)).await {
                Ok(data) => Ok(Bytes::from(data)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.not_found(key)),
                Err(e) => Err(self.io("read", key, e)),
            },
            Kind::S3(s3) => s3.get(key).await,
        }
    }

    /// Streams an object.
    pub async fn reader(&self, key: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>, StoreError> {
        match &self.kind {
            Kind::File { root } => match tokio::fs::File::open(file_path(root, key)).await {
                Ok(file) => Ok(Box::new(tokio::io::BufReader::with_capacity(
                    256 * 1024,
                    file,
                ))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(self.not_found(key)),
                Err(e) => Err(self.io("open", key, e)),
            },
            Kind::S3(s3) => s3.reader(key).await,
        }
    }

    /// Every object whose key starts with `prefix` (`""`: all), sorted by key. Objects still
    /// being written are not listed.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        match &self.kind {
            Kind::File { root } => {
                let root = root.clone();
                let prefix = prefix.to_owned();
                let store = self.describe();
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    walk(&root, &root, &mut out).map_err(|source| StoreError::Io {
                        store,
                        action: "list",
                        key: prefix.clone(),
                        source,
                    })?;
                    out.retain(|o| o.key.starts_with(&prefix));
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    Ok(out)
                })
                .await
                .expect("listing does not panic")
            }
            Kind::S3(s3) => s3.list(prefix).await,
        }
    }

    /// Deletes an object; one already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match &self.kind {
            Kind::File { root } => {
                let path = file_path(root, key);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io("delete", key, e)),
                }
                // Leave no empty backup folders behind (best effort).
                if let Some(parent) = path.parent()
                    && parent != root
                {
                    let _ = tokio::fs::remove_dir(parent).await;
                }
                Ok(())
            }
            Kind::S3(s3) => s3.delete(key).await,
        }
    }

    fn io(&self, action: &'static str, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            store: self.describe(),
            action,
            key: key.to_owned(),
            source,
        }
    }

    fn not_found(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.describe(),
            key: key.to_owned(),
        }
    }
}

fn file_path(root: &Path, key: &str) -> PathBuf {
    root.join(key)
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectInfo>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() && path.extension().is_none_or(|e| e != "partial") {
            let key = path
                .strip_prefix(root)
                .expect("walked under root")
                .to_string_lossy()
                .into_owned();
            out.push(ObjectInfo {
                key,
                size: entry.metadata()?.len(),
            });
        }
    }
    Ok(())
}

/// Writes one object in bounded memory; see [`Store::writer`]. Dropped unfinished, it leaves
/// nothing under its key (on S3 its multipart upload is aborted in the background).
pub struct ObjectWriter {
    store: String,
    key: String,
    sha: Sha256,
    size: u64,
    sink: Sink,
}

enum Sink {
    File {
        file: tokio::io::BufWriter<tokio::fs::File>,
        partial: PathBuf,
        path: PathBuf,
    },
    S3(Box<s3::S3Upload>),
}

impl ObjectWriter {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.sha.update(data);
        self.size += data.len() as u64;
        match &mut self.sink {
            Sink::File { file, .. } => {
                file.write_all(data).await.map_err(|source| StoreError::Io {
                    store: self.store.clone(),
                    action: "write",
                    key: self.key.clone(),
                    source,
                })
            }
            Sink::S3(upload) => upload.write(data).await,
        }
    }

    /// Makes the object visible under its key, durably.
    pub async fn finish(mut self) -> Result<Written, StoreError> {
        let written = Written {
            size: self.size,
            sha256: hex::encode(std::mem::take(&mut self.sha).finalize()),
        };
        let store = self.store.clone();
        let key = self.key.clone();
        let io = |action, source| StoreError::Io {
            store: store.clone(),
            action,
            key: key.clone(),
            source,
        };
        match &mut self.sink {
            Sink::File {
                file,
                partial,
                path,
            } => {
                file.flush().await.map_err(|e| io("write", e))?;
                file.get_ref().sync_all().await.map_err(|e| io("sync", e))?;
                tokio::fs::rename(&*partial, &*path)
                    .await
                    .map_err(|e| io("rename", e))?;
                // The rename itself is durable once the folder is synced.
                if let Some(parent) = path.parent()
                    && let Ok(dir) = tokio::fs::File::open(parent).await
                {
                    let _ = dir.sync_all().await;
                }
                *partial = PathBuf::new();
            }
            Sink::S3(upload) => upload.finish().await?,
        }
        Ok(written)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        match &mut self.sink {
            Sink::File { partial, .. } => {
                if !partial.as_os_str().is_empty() {
                    let _ = std::fs::remove_file(partial);
                }
            }
            Sink::S3(upload) => upload.abandon(),
        }
    }
}
