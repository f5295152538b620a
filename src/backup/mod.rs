//! Backups: consistent, compressed, checksummed dumps to a folder or an S3-compatible store,
//! with a manifest written last, retention, verification by restoring, and restore.

pub mod store;
