//! A backend written for Meta's webhooks, unchanged behind the relay (issue 12.5): a bot on
//! pywa (a WhatsApp library from PyPI, installed pinned into `target/pywa-venv` by this test)
//! with its own routes and signature validation on. Every update of `tests/payloads/updates.json`
//! (Meta's shapes: messages of every type, statuses with contacts, template, account, call,
//! preference and coexistence updates) is posted to one such backend the way Meta posts it,
//! and through the relay (`DELIVERY_FORMAT=meta`, `DELIVERY_PATH=/`, pushed) to another: the
//! same handlers fire for the same updates. Each update is stored once (Meta retries it) and
//! kept with its item's text byte for byte.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bite_sync::relay::signature::sign;
use serde_json::Value;
use support::{count, test_dbs, wait_for};

const APP_SECRET: &str = "pywa-app-secret-51c2";
const VERIFY_TOKEN: &str = "pywa-verify-token";

/// The venv with tests/pywa/requirements.txt installed (once per requirements file).
fn venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let requirements = root.join("tests/pywa/requirements.txt");
    let dir = root.join("target/pywa-venv");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    let marker = dir.join("installed-requirements.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&dir),
        "python3 -m venv",
    );
    run(
        Command::new(dir.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "-r",
            ])
            .arg(&requirements),
        "pip install -r tests/pywa/requirements.txt",
    );
    std::fs::write(&marker, wanted).unwrap();
    dir
}

/// A pywa backend process and where it records the handlers it ran.
struct Backend {
    child: std::process::Child,
    url: String,
    record: PathBuf,
}

impl Backend {
    fn start(venv: &Path, dir: &Path, name: &str) -> Backend {
        let record = dir.join(format!("{name}.jsonl"));
        let mut child = Command::new(venv.join("bin/python"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pywa/backend.py"))
            .args([APP_SECRET, VERIFY_TOKEN])
            .arg(&record)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("start the pywa backend");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the pywa backend did not start: {line:?}"));
        Backend {
            child,
            url: format!("http://127.0.0.1:{port}"),
            record,
        }
    }

    /// Handler → the ids of the updates it ran for, sorted.
    fn fired(&self) -> BTreeMap<String, Vec<String>> {
        let mut fired: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
        {
            let v: Value = serde_json::from_str(line).unwrap();
            fired
                .entry(v["handler"].as_str().unwrap().to_string())
                .or_default()
                .push(v["id"].as_str().unwrap().to_string());
        }
        fired.values_mut().for_each(|ids| ids.sort());
        fired
    }

    fn calls(&self) -> usize {
        self.fired().values().map(Vec::len).sum()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(url: &str, body: &[u8]) -> u16 {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("X-Hub-Signature-256", sign(APP_SECRET.as_bytes(), body))
        .body(body.to_vec())
        .send()
        .await
        .expect("POST")
        .status()
        .as_u16()
}

/// The text of the one message, status, echo or change value of a single-item update, as
/// serde_json writes it (which is how the test posts it).
fn item_text(update: &Value) -> String {
    let value = &update["entry"][0]["changes"][0]["value"];
    for list in ["messages", "statuses", "message_echoes"] {
        if let Some(items) = value.get(list).and_then(Value::as_array) {
            return items[0].to_string();
        }
    }
    value.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pywa_bot_fires_the_same_handlers_behind_the_relay_as_behind_meta() {
    let venv = tokio::task::spawn_blocking(venv).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let direct = Backend::start(&venv, dir.path(), "direct");
    let relayed = Backend::start(&venv, dir.path(), "relayed");
    let dbs = test_dbs("pywa").await;
    let (relay, relay_url) = support::start_relay(&[
        ("DATABASE_URL", dbs.mirror_url.clone()),
        ("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.into()),
        ("META_APP_SECRET", APP_SECRET.into()),
        ("DELIVERY_MODE", "push".into()),
        ("LOCAL_BACKEND_URL", relayed.url.clone()),
        ("DELIVERY_FORMAT", "meta".into()),
        ("DELIVERY_PATH", "/".into()),
    ])
    .await;
    let db = support::connect(&dbs.mirror_url).await;
    let updates: BTreeMap<String, Value> =
        serde_json::from_slice(&support::payload("updates.json")).unwrap();
    for (name, update) in &updates {
        let body = serde_json::to_vec(update).unwrap();
        assert_eq!(post(&direct.url, &body).await, 200, "{name}: Meta → pywa");
        // Meta retries: the relay stores it once.
        for _ in 0..2 {
            let status = post(&format!("{relay_url}/api/webhook"), &body).await;
            assert_eq!(status, 200, "{name}: Meta → relay");
        }
    }
    let expected = wait_for(
        "pywa to handle Meta's posts",
        Duration::from_secs(30),
        || async { (direct.calls() >= 28).then(|| direct.fired()) },
    )
    .await;
    wait_for(
        "pywa to handle the relay's deliveries",
        Duration::from_secs(60),
        || async {
            (count(
                &db,
                "SELECT count(*) FROM bite_sync.inbox WHERE delivery_state = 'delivered'",
            )
            .await
                == updates.len() as i64)
                .then_some(())
        },
    )
    .await;
    // The handlers run after pywa's 200: a moment for the last ones.
    wait_for("the relayed handlers", Duration::from_secs(10), || async {
        (relayed.calls() >= direct.calls()).then_some(())
    })
    .await;
    assert_eq!(
        relayed.fired(),
        expected,
        "the same handlers for the same updates\nrelay log:\n{}",
        relay.log()
    );
    assert!(
        expected.len() >= 15,
        "pywa handled too few kinds: {expected:?}"
    );
    // Stored once each, and each item's text exactly as posted.
    assert_eq!(
        count(&db, "SELECT count(*) FROM bite_sync.inbox").await,
        updates.len() as i64
    );
    let envelopes: Vec<String> =
        support::strings(&db, "SELECT envelope FROM bite_sync.inbox").await;
    for (name, update) in &updates {
        let item = item_text(update);
        let stored: Vec<&String> = envelopes.iter().filter(|e| e.contains(&item)).collect();
        assert_eq!(stored.len(), 1, "{name}: its text kept byte for byte, once");
        let narrowed: Value = serde_json::from_str(stored[0]).unwrap();
        assert_eq!(&narrowed, update, "{name}: one item, so Meta's whole body");
    }
}
