//! Throwaway local PostgreSQL clusters for `bite-sync demo`, the integration tests and the
//! benchmark: `initdb` into a fresh temp dir, configure, `pg_ctl start`.
//!
//! Invariants:
//! - Everything a cluster owns lives in one temp dir (`data/`, `server.log` and the Unix
//!   socket), so removing that dir removes every trace of it.
//! - Nothing is left running. [`TempCluster::stop`] and `Drop` stop the server and remove the
//!   dir; a detached watchdog shell does the same once the owning process is gone, for the
//!   cases where no destructor runs (`kill -9`, abort, statics in the test harness).
//! - The server listens only on 127.0.0.1 and on a socket inside its own dir, trusts every
//!   local connection and runs with `fsync=off`: it holds throwaway data, never real data.
//! - As root, `initdb`/`pg_ctl` run as the `postgres` user (initdb refuses root), and that
//!   user owns the dir.
//! - The API is blocking (`std::process`), so it works from sync code, tests and `main`.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::connect::percent_encode;

const HOST: &str = "127.0.0.1";

/// Where Debian/Ubuntu's postgresql-common puts each major version's binaries.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

const SERVER_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// The superuser created by initdb, and the OS user that owns clusters started as root.
const SUPERUSER: &str = "postgres";

/// A port picked by binding to port 0 can be taken by someone else before the server binds
/// it; a few fresh picks make that race irrelevant.
const START_ATTEMPTS: usize = 5;

const LOG_TAIL_LINES: usize = 20;

/// Linux's `sun_path` holds 108 bytes including the NUL, and the server appends
/// `/.s.PGSQL.<port>` to the socket directory.
const MAX_SOCKET_DIR_LEN: usize = 107 - "/.s.PGSQL.65535".len();

/// Polls for the owner every second and then stops the server and removes the dir. A dead
/// owner that its parent has not reaped yet still answers `kill -0`, hence the zombie check.
/// If `pg_ctl stop` fails, killing the postmaster still beats leaving it running.
const WATCHDOG_SCRIPT: &str = r#"
owner=$1
dir=$2
shift 2
while kill -0 "$owner" 2>/dev/null; do
  case "$(cat "/proc/$owner/stat" 2>/dev/null)" in *") Z "*) break ;; esac
  sleep 1
done
if ! "$@" >/dev/null 2>&1; then
  pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null)
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$dir"
"#;

/// How to set up a [`TempCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Short label used in the temp dir name and messages: "source" / "mirror".
    pub name: String,
    /// wal_level=logical, max_replication_slots=10, max_wal_senders=10.
    pub logical: bool,
    /// Extra postgresql.conf settings, e.g. ("shared_buffers", "256MB").
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            name: "pg".to_owned(),
            logical: false,
            settings: Vec::new(),
        }
    }
}

/// Why a throwaway cluster could not be found, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No directory with `initdb`, `pg_ctl` and `postgres` was found.
    #[error(
        "postgresql server binaries not found: looked for initdb, pg_ctl and postgres in {looked_in}; install them with: apt-get install postgresql-15 (Debian/Ubuntu), or set PG_BIN_DIR to the directory that holds initdb and pg_ctl"
    )]
    BinariesNotFound {
        /// The places searched, in order.
        looked_in: String,
    },
    /// Running as root, but there is no `postgres` OS user to run `initdb` as.
    #[error(
        "running as root needs a `postgres` system user to own the cluster, because initdb refuses to run as root"
    )]
    NoServerUser,
    /// A setting name that could smuggle other text into postgresql.conf.
    #[error("invalid setting name {0:?}: use only letters, digits, '_' and '.'")]
    InvalidSetting(String),
    /// A filesystem or process operation failed.
    #[error("could not {action}")]
    Io {
        /// What was being done, e.g. "create a temp dir in /tmp".
        action: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `initdb` or another helper program exited unsuccessfully.
    #[error("{program} failed for the {cluster} cluster ({status}): {output}")]
    Command {
        /// The cluster's label.
        cluster: String,
        /// The program that failed.
        program: String,
        /// Its exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// `pg_ctl start` failed; the log tail usually says why.
    #[error(
        "the {cluster} cluster did not start on port {port}: {pg_ctl}\nlast lines of the server log:\n{tail}"
    )]
    Start {
        /// The cluster's label.
        cluster: String,
        /// The port of the last attempt.
        port: u16,
        /// What `pg_ctl` printed.
        pg_ctl: String,
        /// The last lines of the server log (which is removed with the cluster dir).
        tail: String,
    },
    /// Neither a fast nor an immediate shutdown worked.
    #[error("could not stop the {cluster} cluster in {data_dir}: {output}")]
    Stop {
        /// The cluster's label.
        cluster: String,
        /// Its data dir.
        data_dir: String,
        /// What `pg_ctl stop -m immediate` printed.
        output: String,
    },
}

/// A running throwaway cluster. Stopped and deleted by [`TempCluster::stop`], on drop, or by
/// its watchdog when the owning process dies.
#[derive(Debug)]
pub struct TempCluster {
    name: String,
    port: u16,
    bin_dir: PathBuf,
    /// The temp dir that holds everything; `data_dir` is `dir/data`.
    dir: PathBuf,
    data_dir: PathBuf,
    /// `Some(user)` when running as root: programs run through `runuser -u user`.
    run_as: Option<String>,
    watchdog: Option<Child>,
    stopped: bool,
}

impl TempCluster {
    /// Creates, configures and starts a cluster, blocking until it accepts connections.
    pub fn start(opts: &ClusterOptions) -> Result<TempCluster, ClusterError> {
        // Validate before creating anything, so a bad option leaves nothing behind.
        for (key, _) in &opts.settings {
            validate_setting_name(key)?;
        }
        let bin_dir = find_bin_dir()?;
        let server_user = if is_root() {
            Some(lookup_user(SUPERUSER)?)
        } else {
            None
        };
        let label = label(&opts.name);
        let base = temp_base(&label, server_user.is_some());
        let dir = tempfile::Builder::new()
            .prefix(&format!("bite-sync-{label}-"))
            .tempdir_in(&base)
            .map_err(|source| ClusterError::Io {
                action: format!("create a temp dir in {}", base.display()),
                source,
            })?
            .keep();
        // From here on, `cluster`'s Drop removes the dir if anything fails.
        let mut cluster = TempCluster {
            name: opts.name.clone(),
            port: 0,
            bin_dir,
            data_dir: dir.join("data"),
            dir,
            run_as: server_user.as_ref().map(|_| SUPERUSER.to_owned()),
            watchdog: None,
            stopped: false,
        };
        if let Some((uid, gid)) = server_user {
            std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid)).map_err(|source| {
                ClusterError::Io {
                    action: format!("give {} to the postgres user", cluster.dir.display()),
                    source,
                }
            })?;
        }
        // The watchdog starts before initdb, so a kill during startup is covered too.
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.initdb()?;
        cluster.configure(opts)?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: always "127.0.0.1".
    pub fn host(&self) -> &str {
        HOST
    }

    /// "postgres://postgres@127.0.0.1:{port}/{dbname}?sslmode=disable"
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{HOST}:{}/{}?sslmode=disable",
            self.port,
            percent_encode(dbname)
        )
    }

    /// The directory holding `initdb`, `pg_ctl`, `psql`, `pg_dump`... used for this cluster.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster's data directory (`PGDATA`); its parent is the cluster's temp dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server the way `mode` says (`fast`, or `immediate`, which is a crash: the
    /// next start runs recovery) and starts it again on the same port; for tests of what
    /// clients do while a server restarts.
    pub fn restart(&self, mode: &str) -> Result<(), ClusterError> {
        let out = self.pg_ctl_stop(mode)?;
        if !out.status.success() {
            return Err(ClusterError::Stop {
                cluster: self.name.clone(),
                data_dir: self.data_dir.display().to_string(),
                output: output_text(&out),
            });
        }
        let log = self.dir.join("server.log");
        let mut cmd = self.pg_command("pg_ctl");
        cmd.args(["-w", "-t", "60", "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-o", &format!("-p {}", self.port), "start"]);
        let out = self.run(cmd, "pg_ctl start")?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Start {
                cluster: self.name.clone(),
                port: self.port,
                pg_ctl: output_text(&out),
                tail: log_tail(&log, LOG_TAIL_LINES),
            })
        }
    }

    /// Stops the server (pg_ctl stop -m fast, then immediate if needed) and removes the dir.
    pub fn stop(mut self) -> Result<(), ClusterError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ClusterError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.stop_server()?;
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ClusterError::Io {
                    action: format!("remove {}", self.dir.display()),
                    source,
                });
            }
        }
        // Only now: on any error above, the watchdog is the last chance to clean up.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        Ok(())
    }

    /// A command for one of the server binaries, run as the server user when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let program = self.bin_dir.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new(runuser());
                cmd.args(["-u", user, "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        // The server user may not be able to enter our cwd, and English messages are what
        // the port-in-use check and bug reports expect.
        cmd.current_dir(&self.dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, mut cmd: Command, program: &str) -> Result<Output, ClusterError> {
        cmd.output().map_err(|source| ClusterError::Io {
            action: format!("run {program} for the {} cluster", self.name),
            source,
        })
    }

    fn spawn_watchdog(&self) -> Result<Child, ClusterError> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("bite-sync-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.dir);
        if let Some(user) = &self.run_as {
            cmd.arg(runuser()).args(["-u", user, "--"]);
        }
        cmd.arg(self.bin_dir.join("pg_ctl"))
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "30"])
            // Its own process group: a Ctrl-C or a group kill aimed at the owner must not
            // take the watchdog with it. Null stdio: it must not hold a test runner's pipes.
            .process_group(0)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.spawn().map_err(|source| ClusterError::Io {
            action: format!("start the watchdog for the {} cluster", self.name),
            source,
        })
    }

    fn initdb(&self) -> Result<(), ClusterError> {
        let out = self.run_initdb("C.UTF-8")?;
        // C.UTF-8 sorts like C but keeps UTF-8 character classes; minimal systems lack it,
        // and plain C is fine for throwaway data.
        let out = if !out.status.success() && output_text(&out).contains("locale") {
            self.run_initdb("C")?
        } else {
            out
        };
        if out.status.success() {
            return Ok(());
        }
        Err(ClusterError::Command {
            cluster: self.name.clone(),
            program: "initdb".to_owned(),
            status: out.status.to_string(),
            output: output_text(&out),
        })
    }

    fn run_initdb(&self, locale: &str) -> Result<Output, ClusterError> {
        let mut cmd = self.pg_command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "-N"])
            .arg(format!("--locale={locale}"));
        self.run(cmd, "initdb")
    }

    fn configure(&self, opts: &ClusterOptions) -> Result<(), ClusterError> {
        let conf = self.data_dir.join("postgresql.conf");
        let text = conf_text(opts, &self.dir);
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|source| ClusterError::Io {
                action: format!("append settings to {}", conf.display()),
                source,
            })
    }

    fn start_server(&mut self) -> Result<(), ClusterError> {
        let log = self.dir.join("server.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let mut cmd = self.pg_command("pg_ctl");
            // The port goes on the command line, not in postgresql.conf, because it changes
            // per attempt.
            cmd.args(["-w", "-t", "60", "-D"])
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&log)
                .args(["-o", &format!("-p {port}"), "start"]);
            let out = self.run(cmd, "pg_ctl start")?;
            if out.status.success() {
                self.port = port;
                return Ok(());
            }
            let port_taken = read_from(&log, log_start).contains("Address already in use");
            if port_taken && attempt < START_ATTEMPTS {
                continue;
            }
            // pg_ctl may give up while the server is still coming up.
            let _ = self.pg_ctl_stop("immediate");
            return Err(ClusterError::Start {
                cluster: self.name.clone(),
                port,
                pg_ctl: output_text(&out),
                tail: log_tail(&log, LOG_TAIL_LINES),
            });
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<Output, ClusterError> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", "30"]);
        self.run(cmd, "pg_ctl stop")
    }

    fn stop_server(&self) -> Result<(), ClusterError> {
        if !self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        if matches!(self.pg_ctl_stop("fast"), Ok(out) if out.status.success()) {
            return Ok(());
        }
        let out = self.pg_ctl_stop("immediate")?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Stop {
                cluster: self.name.clone(),
                data_dir: self.data_dir.display().to_string(),
                output: output_text(&out),
            })
        }
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Finds the server binaries: env PG_BIN_DIR, else the highest /usr/lib/postgresql/<N>/bin
/// containing initdb, pg_ctl and postgres, else `pg_config --bindir` if it has them.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    locate_bin_dir(
        std::env::var_os("PG_BIN_DIR"),
        Path::new(DEBIAN_ROOT),
        pg_config_bindir,
    )
}

fn locate_bin_dir(
    env_dir: Option<OsString>,
    debian_root: &Path,
    pg_config: impl FnOnce() -> Option<PathBuf>,
) -> Result<PathBuf, ClusterError> {
    if let Some(dir) = env_dir.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        // An explicit PG_BIN_DIR that lacks the binaries is a mistake to report, not one to
        // paper over with whatever other version happens to be installed.
        return Err(ClusterError::BinariesNotFound {
            looked_in: format!("PG_BIN_DIR={}", dir.display()),
        });
    }
    if let Some(dir) = newest_versioned_bin_dir(debian_root) {
        return Ok(dir);
    }
    let mut looked_in = vec![format!("{}/<version>/bin", debian_root.display())];
    match pg_config() {
        Some(dir) if has_server_binaries(&dir) => return Ok(dir),
        Some(dir) => looked_in.push(format!("{} (from pg_config --bindir)", dir.display())),
        None => looked_in.push("pg_config --bindir (no pg_config on PATH)".to_owned()),
    }
    Err(ClusterError::BinariesNotFound {
        looked_in: looked_in.join(" and "),
    })
}

fn newest_versioned_bin_dir(root: &Path) -> Option<PathBuf> {
    let entries = fs::read_dir(root).ok()?;
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = parse_version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// "15" → [15], "9.6" → [9, 6]: numeric, so that 10 sorts above 9.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn has_server_binaries(dir: &Path) -> bool {
    SERVER_BINARIES.iter().all(|bin| {
        fs::metadata(dir.join(bin))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

fn validate_setting_name(key: &str) -> Result<(), ClusterError> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::InvalidSetting(key.to_owned()))
    }
}

/// The lines appended to postgresql.conf; later lines win, so `opts.settings` can override
/// the defaults here.
fn conf_text(opts: &ClusterOptions, socket_dir: &Path) -> String {
    let mut lines: Vec<(String, String)> = vec![
        ("fsync".into(), "off".into()),
        ("listen_addresses".into(), HOST.into()),
        (
            "unix_socket_directories".into(),
            socket_dir.to_string_lossy().into_owned(),
        ),
        ("max_connections".into(), "200".into()),
    ];
    if opts.logical {
        lines.push(("wal_level".into(), "logical".into()));
        lines.push(("max_replication_slots".into(), "10".into()));
        lines.push(("max_wal_senders".into(), "10".into()));
    }
    lines.extend(opts.settings.iter().cloned());
    let mut text = String::from("\n# added by bite-sync for a throwaway cluster\n");
    for (key, value) in lines {
        // Every setting type accepts a quoted value, and quoting means a value can never
        // end the line or start a comment.
        text.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
    }
    text
}

/// A temp dir name part made of safe characters only.
fn label(name: &str) -> String {
    let label: String = name
        .chars()
        .take(20)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if label.is_empty() {
        "pg".to_owned()
    } else {
        label
    }
}

/// The system temp dir, unless the socket path would be too long there or (as root) the
/// server user could not reach it; then /tmp, which is short and world-traversable.
fn temp_base(label: &str, as_root: bool) -> PathBuf {
    let base = std::env::temp_dir();
    // "/bite-sync-{label}-" plus tempfile's 6 random characters.
    let dir_len = base.as_os_str().len() + "/bite-sync-".len() + label.len() + 1 + 6;
    let reachable = !as_root || others_can_traverse(&base);
    if dir_len <= MAX_SOCKET_DIR_LEN && reachable {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

fn others_can_traverse(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    dir.ancestors().all(|d| {
        fs::metadata(d)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of an OS user.
fn lookup_user(name: &str) -> Result<(u32, u32), ClusterError> {
    let c_name = std::ffi::CString::new(name).map_err(|_| ClusterError::NoServerUser)?;
    // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids) to be filled in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer refers to live, writable memory of the stated size for the whole
    // call, and getpwnam_r (unlike getpwnam) keeps no global state.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(ClusterError::NoServerUser);
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

fn runuser() -> PathBuf {
    ["/usr/sbin/runuser", "/sbin/runuser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("runuser"))
}

fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| ClusterError::Io {
            action: "find a free TCP port on 127.0.0.1".to_owned(),
            source,
        })
}

fn output_text(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = text.trim();
    if text.is_empty() {
        "(no output)".to_owned()
    } else {
        text.to_owned()
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    let read = fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_end(&mut bytes)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = read_from(path, 0);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        "(the log is empty)".to_owned()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bin_dir(root: &Path, version: &str, binaries: &[&str]) -> PathBuf {
        let bin = root.join(version).join("bin");
        fs::create_dir_all(&bin).unwrap();
        for name in binaries {
            let path = bin.join(name);
            fs::write(&path, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    #[test]
    fn picks_the_highest_complete_version_numerically() {
        let root = tempfile::tempdir().unwrap();
        fake_bin_dir(root.path(), "9.6", &SERVER_BINARIES);
        let fifteen = fake_bin_dir(root.path(), "15", &SERVER_BINARIES);
        fake_bin_dir(root.path(), "16", &["initdb", "pg_ctl"]);
        let found = locate_bin_dir(None, root.path(), || None).unwrap();
        assert_eq!(found, fifteen);
    }

    #[test]
    fn pg_bin_dir_wins_and_is_not_second_guessed() {
        let root = tempfile::tempdir().unwrap();
        fake_bin_dir(root.path(), "15", &SERVER_BINARIES);
        let custom = fake_bin_dir(root.path(), "custom", &SERVER_BINARIES);
        let found = locate_bin_dir(Some(custom.clone().into()), root.path(), || None).unwrap();
        assert_eq!(found, custom);

        let empty = tempfile::tempdir().unwrap();
        let err = locate_bin_dir(Some(empty.path().into()), root.path(), || None).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("PG_BIN_DIR="), "{message}");
    }

    #[test]
    fn non_executable_files_do_not_count() {
        let root = tempfile::tempdir().unwrap();
        let bin = fake_bin_dir(root.path(), "15", &SERVER_BINARIES);
        fs::set_permissions(bin.join("postgres"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(locate_bin_dir(None, root.path(), || None).is_err());
    }

    #[test]
    fn falls_back_to_pg_config() {
        let root = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let bin = fake_bin_dir(other.path(), "x", &SERVER_BINARIES);
        let found = locate_bin_dir(None, root.path(), || Some(bin.clone())).unwrap();
        assert_eq!(found, bin);
    }

    #[test]
    fn missing_binaries_say_what_was_looked_for_and_how_to_install() {
        let root = tempfile::tempdir().unwrap();
        let err = locate_bin_dir(None, root.path(), || None).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("looked for initdb, pg_ctl and postgres in"),
            "{message}"
        );
        assert!(
            message.ends_with(
                "install them with: apt-get install postgresql-15 (Debian/Ubuntu), or set PG_BIN_DIR to the directory that holds initdb and pg_ctl"
            ),
            "{message}"
        );
        assert!(message.contains("pg_config"), "{message}");
    }

    #[test]
    fn bad_setting_names_are_rejected_before_anything_is_created() {
        let opts = ClusterOptions {
            settings: vec![("work_mem = 1\nfsync".into(), "on".into())],
            ..ClusterOptions::default()
        };
        let err = TempCluster::start(&opts).unwrap_err();
        assert!(matches!(err, ClusterError::InvalidSetting(_)), "{err}");
    }

    #[test]
    fn conf_text_quotes_values_and_puts_settings_last() {
        let opts = ClusterOptions {
            name: "x".into(),
            logical: true,
            settings: vec![
                ("fsync".into(), "on".into()),
                ("application_name".into(), "it's".into()),
            ],
        };
        let text = conf_text(&opts, Path::new("/tmp/d"));
        assert!(text.contains("unix_socket_directories = '/tmp/d'\n"));
        assert!(text.contains("wal_level = 'logical'\n"));
        assert!(text.contains("application_name = 'it''s'\n"));
        let default_fsync = text.find("fsync = 'off'").unwrap();
        let override_fsync = text.find("fsync = 'on'").unwrap();
        assert!(default_fsync < override_fsync);

        let plain = conf_text(&ClusterOptions::default(), Path::new("/tmp/d"));
        assert!(!plain.contains("wal_level"));
    }

    #[test]
    fn labels_are_safe_for_file_names() {
        assert_eq!(label("Source DB/1"), "source-db-1");
        assert_eq!(label(""), "pg");
        assert_eq!(label(&"x".repeat(50)).len(), 20);
    }

    #[test]
    fn urls_encode_unusual_database_names() {
        assert_eq!(percent_encode("orders_2024"), "orders_2024");
        assert_eq!(percent_encode("a b/ñ"), "a%20b%2F%C3%B1");
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("10").unwrap() > parse_version("9.6").unwrap());
        assert_eq!(parse_version("15beta"), None);
    }
}
