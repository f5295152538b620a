//! Client-side encryption of backup objects with [age](https://age-encryption.org/v1): the
//! keys, the encoder a backup writes objects through (gzip, then age), and the decrypting
//! reader a restore reads them through.
//!
//! Invariants:
//! - A machine that backs up needs only the recipient (public key); the identity (secret key)
//!   is needed to restore or verify, and never appears in logs, errors or `Debug` output.
//! - Objects are standard age files (X25519 recipient, 64 KiB STREAM chunks, each
//!   authenticated), so `age -d -i key.txt` or `rage` decrypt them without bite-sync.
//! - Memory stays bounded: the encoder's output is drained by the caller in parts, and the
//!   reader decrypts one chunk at a time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use age::secrecy::ExposeSecret as _;
use flate2::Compression;
use flate2::write::GzEncoder;
use tokio::io::{AsyncBufRead, AsyncRead};
use tokio_util::compat::{FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};

/// The environment variable that holds an identity (it wins over `backup.identity_file`).
pub const IDENTITY_ENV: &str = "BITE_BACKUP_IDENTITY";

/// What `backups keygen` tells users to do with a key.
const SECRET_PREFIX: &str = "AGE-SECRET-KEY-1";

/// Whom backups are encrypted to: an age X25519 public key (`age1...`).
#[derive(Clone, PartialEq, Eq)]
pub struct Recipient(age::x25519::Recipient);

impl Recipient {
    /// Parses `age1...`; the error says what was expected (a public key is no secret).
    pub fn parse(text: &str) -> Result<Recipient, String> {
        text.trim().parse().map(Recipient).map_err(|reason| {
            let hint = if text.trim().starts_with(SECRET_PREFIX) {
                "this is a secret identity; give its public key (age1...), which `bite-sync backups keygen` prints"
                    .to_owned()
            } else {
                format!("got {text:?}")
            };
            format!("expected an age recipient (a public key starting with age1): {reason}; {hint}")
        })
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipient({})", self.0)
    }
}

/// The secret that decrypts backups encrypted to its [`Recipient`]. `Debug` shows only the
/// recipient.
#[derive(Clone)]
pub struct Identity(Arc<age::x25519::Identity>);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity(<secret for {}>)", self.recipient())
    }
}

/// An identity that could not be loaded; never shows the secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        /// Where it was configured.
        key: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No usable `AGE-SECRET-KEY-1...` line.
    #[error(
        "{key}: expected an age identity (a line starting with {SECRET_PREFIX}, as `bite-sync backups keygen` or `age-keygen` write): {reason}"
    )]
    Invalid {
        /// Where it came from.
        key: String,
        /// What is wrong (never the key itself).
        reason: &'static str,
    },
}

impl Identity {
    /// A new random identity.
    pub fn generate() -> Identity {
        Identity(Arc::new(age::x25519::Identity::generate()))
    }

    /// Parses an identity file's text (`#` comments and blank lines allowed, as `age-keygen`
    /// writes it) or a bare `AGE-SECRET-KEY-1...`; `key` names where it came from.
    pub fn parse(text: &str, key: &str) -> Result<Identity, KeyError> {
        let invalid = |reason| KeyError::Invalid {
            key: key.to_owned(),
            reason,
        };
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let line = lines.next().ok_or_else(|| invalid("it is empty"))?;
        if lines.next().is_some() {
            return Err(invalid(
                "it holds more than one key; give the one for these backups",
            ));
        }
        if !line.starts_with(SECRET_PREFIX) {
            return Err(invalid("it does not start with AGE-SECRET-KEY-1"));
        }
        line.parse().map(|i| Identity(Arc::new(i))).map_err(invalid)
    }

    /// Reads `BITE_BACKUP_IDENTITY` (through `env`), else `file` (`backup.identity_file`);
    /// `None` when neither is set.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Identity>, KeyError> {
        if let Some(text) = env(IDENTITY_ENV).filter(|t| !t.trim().is_empty()) {
            return Identity::parse(&text, IDENTITY_ENV).map(Some);
        }
        let Some(path) = file else {
            return Ok(None);
        };
        let key = format!("backup.identity_file ({})", path.display());
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            key: "backup.identity_file".into(),
            path: path.to_owned(),
            source,
        })?;
        Identity::parse(&text, &key).map(Some)
    }

    /// Its public key: what backups are encrypted to.
    pub fn recipient(&self) -> Recipient {
        Recipient(self.0.to_public())
    }

    /// The text of an identity file, as `age-keygen` writes it: when, the public key, the
    /// secret.
    pub fn file_text(&self, created: chrono::DateTime<chrono::Utc>) -> String {
        format!(
            "# created: {}\n# public key: {}\n{}\n",
            created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.recipient(),
            self.0.to_string().expose_secret()
        )
    }
}

/// Bytes written by the layers, waiting for the caller to drain them. Shared because age's
/// writer owns its sink and offers no way back to it until it finishes.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("output lock").extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Below gzip: the output itself, or age encrypting into it.
enum Layer {
    Plain(Output),
    Age(age::stream::StreamWriter<Output>),
}

impl Write for Layer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Layer::Plain(o) => o.write(data),
            Layer::Age(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Layer::Plain(o) => o.flush(),
            Layer::Age(w) => w.flush(),
        }
    }
}

/// How one object's bytes are made: gzip, then, with a recipient, age. The caller writes
/// plain text, drains what is ready with [`Encoder::drain`] whenever [`Encoder::pending`] is
/// large enough, and stores what [`Encoder::finish`] returns last.
pub struct Encoder {
    gzip: GzEncoder<Layer>,
    output: Output,
}

impl Encoder {
    /// An encoder at gzip `level`, encrypting to `recipient` if there is one.
    pub fn new(level: u32, recipient: Option<&Recipient>) -> Encoder {
        let output = Output::default();
        let layer = match recipient {
            None => Layer::Plain(output.clone()),
            Some(r) => {
                let encryptor =
                    age::Encryptor::with_recipients(std::iter::once(&r.0 as &dyn age::Recipient))
                        .expect("one X25519 recipient is always valid");
                Layer::Age(
                    encryptor
                        .wrap_output(output.clone())
                        .expect("writing to memory"),
                )
            }
        };
        Encoder {
            gzip: GzEncoder::new(layer, Compression::new(level)),
            output,
        }
    }

    /// Adds plain text.
    pub fn write(&mut self, data: &[u8]) {
        self.gzip.write_all(data).expect("writing to memory");
    }

    /// Bytes ready to be stored.
    pub fn pending(&self) -> usize {
        self.output.0.lock().expect("output lock").len()
    }

    /// Moves the bytes ready to be stored into `into` (cleared first), keeping both buffers'
    /// allocations.
    pub fn drain(&mut self, into: &mut Vec<u8>) {
        into.clear();
        std::mem::swap(&mut *self.output.0.lock().expect("output lock"), into);
    }

    /// Ends the gzip member and the age stream; the last bytes to store.
    pub fn finish(self) -> Vec<u8> {
        match self.gzip.finish().expect("writing to memory") {
            Layer::Plain(_) => {}
            Layer::Age(w) => {
                w.finish().expect("writing to memory");
            }
        }
        std::mem::take(&mut *self.output.0.lock().expect("output lock"))
    }

    /// Encodes a whole small text at once.
    pub fn encode(level: u32, recipient: Option<&Recipient>, data: &[u8]) -> Vec<u8> {
        let mut encoder = Encoder::new(level, recipient);
        encoder.write(data);
        encoder.finish()
    }
}

/// Why an object could not be decrypted.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    /// It was not encrypted to this identity.
    #[error("the identity given does not match")]
    WrongIdentity,
    /// It is not an age file, or it was cut short or altered.
    #[error("cannot be decrypted: {0}")]
    Damaged(String),
}

impl From<age::DecryptError> for DecryptError {
    fn from(e: age::DecryptError) -> DecryptError {
        match e {
            age::DecryptError::NoMatchingKeys => DecryptError::WrongIdentity,
            // age's messages describe the file, never the key.
            other => DecryptError::Damaged(other.to_string()),
        }
    }
}

/// Decrypts an age stream as it is read; errors in the payload (a chunk altered or missing)
/// come out of the reader as `io::Error`s.
pub async fn decrypting<R>(
    input: R,
    identity: &Identity,
) -> Result<impl AsyncRead + Send + Unpin + use<R>, DecryptError>
where
    R: AsyncBufRead + Send + Unpin,
{
    let decryptor = age::Decryptor::new_async_buffered(input.compat()).await?;
    let reader = decryptor.decrypt_async(std::iter::once(&*identity.0 as &dyn age::Identity))?;
    Ok(reader.compat())
}

/// Decrypts a whole small object.
pub fn decrypt(data: &[u8], identity: &Identity) -> Result<Vec<u8>, DecryptError> {
    use std::io::Read as _;
    let decryptor = age::Decryptor::new_buffered(data)?;
    let mut reader = decryptor.decrypt(std::iter::once(&*identity.0 as &dyn age::Identity))?;
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .map_err(|e| DecryptError::Damaged(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// Text that compresses badly, so the stored stream spans many age chunks.
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b' ' + (x % 90) as u8
            })
            .collect()
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        use std::io::Read as _;
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Writes `text` in pieces of `sizes` (cycled), draining whenever `drain_at` bytes wait.
    fn encode_in_pieces(
        text: &[u8],
        sizes: &[usize],
        drain_at: usize,
        recipient: Option<&Recipient>,
    ) -> Vec<u8> {
        let mut encoder = Encoder::new(6, recipient);
        let mut stored = Vec::new();
        let mut part = Vec::new();
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at >= text.len() {
                break;
            }
            let end = (at + size).min(text.len());
            encoder.write(&text[at..end]);
            at = end;
            if encoder.pending() >= drain_at {
                encoder.drain(&mut part);
                stored.extend_from_slice(&part);
            }
        }
        stored.extend(encoder.finish());
        stored
    }

    #[tokio::test]
    async fn encrypted_objects_round_trip_through_the_streaming_reader_whatever_the_pieces() {
        let identity = Identity::generate();
        let recipient = identity.recipient();
        for (len, sizes, drain_at) in [
            (0, &[1][..], 1),
            (1, &[1][..], 1),
            (65_535, &[7, 4093][..], 1000),
            (65_536, &[65_536][..], 64 * 1024),
            (300_001, &[1, 65_537, 13][..], 4096),
            (1_000_003, &[100_000][..], 512 * 1024),
        ] {
            let text = noise(len);
            let stored = encode_in_pieces(&text, sizes, drain_at, Some(&recipient));
            assert!(
                stored.starts_with(b"age-encryption.org/v1\n"),
                "an age file"
            );
            // Read back through a small buffer, in odd reads.
            let mut reader = decrypting(
                tokio::io::BufReader::with_capacity(333, &stored[..]),
                &identity,
            )
            .await
            .unwrap();
            let mut gz = Vec::new();
            let mut buf = vec![0u8; 1031];
            loop {
                let n = reader.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                gz.extend_from_slice(&buf[..n]);
            }
            assert_eq!(gunzip(&gz), text, "{len} bytes");
            assert_eq!(gunzip(&decrypt(&stored, &identity).unwrap()), text);
        }
    }

    #[test]
    fn without_a_recipient_the_encoder_is_plain_gzip() {
        let text = noise(200_000);
        let stored = encode_in_pieces(&text, &[999], 10_000, None);
        assert_eq!(&stored[..2], &[0x1f, 0x8b]);
        assert_eq!(gunzip(&stored), text);
    }

    #[tokio::test]
    async fn another_identity_and_a_flipped_byte_are_told_apart() {
        let identity = Identity::generate();
        let stored = Encoder::encode(6, Some(&identity.recipient()), &noise(200_000));
        let other = Identity::generate();
        assert!(matches!(
            decrypt(&stored, &other),
            Err(DecryptError::WrongIdentity)
        ));
        assert!(matches!(
            decrypting(&stored[..], &other).await.err(),
            Some(DecryptError::WrongIdentity)
        ));
        // A payload byte altered: the chunk fails authentication while streaming.
        let mut bad = stored.clone();
        let at = bad.len() - 100;
        bad[at] ^= 1;
        assert!(matches!(
            decrypt(&bad, &identity),
            Err(DecryptError::Damaged(_))
        ));
        let mut reader = decrypting(&bad[..], &identity).await.unwrap();
        let mut out = Vec::new();
        assert!(reader.read_to_end(&mut out).await.is_err());
        // Not age at all.
        assert!(matches!(
            decrypt(b"\x1f\x8b plain gzip", &identity),
            Err(DecryptError::Damaged(_))
        ));
    }

    #[test]
    fn keys_parse_from_files_and_the_secret_never_shows() {
        let identity = Identity::generate();
        let text = identity.file_text(chrono::Utc::now());
        let secret = text.lines().last().unwrap().to_owned();
        assert!(secret.starts_with(SECRET_PREFIX), "{text}");
        assert!(text.contains(&format!("# public key: {}", identity.recipient())));
        let parsed = Identity::parse(&text, "t").unwrap();
        assert_eq!(parsed.recipient(), identity.recipient());
        assert_eq!(
            Identity::parse(&secret, "t").unwrap().recipient(),
            identity.recipient()
        );
        assert!(!format!("{identity:?}").contains(&secret));
        assert!(format!("{identity:?}").contains("age1"));

        let recipient = identity.recipient().to_string();
        assert_eq!(Recipient::parse(&recipient).unwrap(), identity.recipient());
        // The secret where the public key belongs: refused without echoing it.
        let err = Recipient::parse(&secret).unwrap_err();
        assert!(!err.contains(&secret[20..]), "{err}");
        assert!(err.contains("public key"), "{err}");
        assert!(Recipient::parse("age1nope").is_err());

        // Broken identities: the error names where, never the text.
        let broken = format!("{}x", &secret[..secret.len() - 1]);
        let err = Identity::parse(&broken, "backup.identity_file").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("backup.identity_file"), "{msg}");
        assert!(!msg.contains(&broken[20..]), "{msg}");
        assert!(Identity::parse("# only a comment\n", "k").is_err());
        assert!(Identity::parse(&recipient, "k").is_err());
        let two = format!(
            "{secret}\n{}",
            Identity::generate().file_text(chrono::Utc::now())
        );
        assert!(Identity::parse(&two, "k").is_err());
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let from_env = Identity::generate();
        let from_file = Identity::generate();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        std::fs::write(&path, from_file.file_text(chrono::Utc::now())).unwrap();
        let env_text = from_env.file_text(chrono::Utc::now());
        let loaded = Identity::load(Some(&path), |k| {
            (k == IDENTITY_ENV).then(|| env_text.clone())
        })
        .unwrap()
        .unwrap();
        assert_eq!(loaded.recipient(), from_env.recipient());
        let loaded = Identity::load(Some(&path), |_| None).unwrap().unwrap();
        assert_eq!(loaded.recipient(), from_file.recipient());
        assert!(Identity::load(None, |_| None).unwrap().is_none());
        let err = Identity::load(Some(&dir.path().join("missing")), |_| None).unwrap_err();
        assert!(err.to_string().contains("backup.identity_file"), "{err}");
    }
}
