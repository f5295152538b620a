//! Where backups live: a folder (`file:///dir`) or an S3-compatible bucket
//! (`s3://bucket/prefix`: AWS S3, Cloudflare R2, Backblaze B2, Railway buckets, MinIO).
//!
//! Objects are named by keys relative to the location (`20261129T060000Z/manifest.json`).
//! Large objects are written through an [`ObjectWriter`], in memory bounded by one part
//! (S3 multipart upload) no matter how large the object; an object appears only when its
//! writer finishes (a file is renamed into place, a multipart upload completed), so a killed
//! backup leaves no half object under its final name.

use std::path::{Path, PathBuf};

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
    /// Path-style URLs (`endpoint/bucket/key`), which MinIO and most self-hosted stores need.
    pub path_style: bool,
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
    #[error("{store}: {action} {key}: {source}")]
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
    /// The S3 service refused or could not be reached.
    #[error("{store}: {action} {key}: {reason}")]
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
}

impl Store {
    /// Opens `file:///dir` (created if missing) or `s3://bucket[/prefix]`.
    pub async fn open(url: &str, s3: &S3Settings) -> Result<Store, StoreError> {
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
                    action: "create",
                    key: String::new(),
                    source,
                })?;
            return Ok(Store {
                kind: Kind::File { root },
            });
        }
        if url.starts_with("s3://") {
            let _ = s3;
            return Err(bad("S3 is not built yet"));
        }
        Err(bad(
            "expected file:///dir or s3://bucket/prefix (any S3-compatible store)",
        ))
    }

    /// The location as a URL, for messages (no credentials).
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::File { root } => format!("file://{}", root.display()),
        }
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
/// nothing under its key.
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
        }
        Ok(written)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        match &self.sink {
            Sink::File { partial, .. } => {
                if !partial.as_os_str().is_empty() {
                    let _ = std::fs::remove_file(partial);
                }
            }
        }
    }
}
