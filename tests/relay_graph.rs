//! The relay's Graph-API-compatible endpoint with a real client written for Meta's API:
//! `@great-detail/whatsapp` (npm, pinned by `tests/graph_client/package-lock.json`, installed
//! here with `npm ci`) sends through a real relay process to a fake Graph API on loopback,
//! with only its base URL and token changed.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use bite_sync::relay::auth::sign_jwt;
use serde_json::{Value, json};
use support::{Daemon, FakeHttp, Recorded, count, strings, test_dbs};

const PHONE_ID: &str = "106540352242922";
const TOKEN: &str = "EAAG-the-relays-real-token";
const API_KEY: &str = "sync-key-for-the-backend";
const JWT_SECRET: &str = "jwt-secret-graph";

/// The client's directory with its packages installed (once per test process): the files in
/// `tests/graph_client` and `npm ci` from its lockfile.
fn client_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/graph_client");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("graph_client");
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::read(source.join("package-lock.json")).unwrap();
        let installed = std::fs::read(dir.join("package-lock.json")).ok();
        for file in ["package.json", "package-lock.json", "client.mjs"] {
            std::fs::copy(source.join(file), dir.join(file)).unwrap();
        }
        let have = dir
            .join("node_modules/@great-detail/whatsapp/package.json")
            .exists();
        if !have || installed.as_deref() != Some(&lock[..]) {
            let out = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| {
                    panic!("npm is needed for this test (bash .ci/run installs it): {e}")
                });
            assert!(
                out.status.success(),
                "npm ci failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        dir
    })
}

/// A Graph API as Meta answers: messages get a wamid, read receipts success, media an id;
/// a message to 34655555555 is outside the 24-hour window.
async fn graph() -> FakeHttp {
    let n = Arc::new(Mutex::new(0u32));
    FakeHttp::with(move |r| {
        if r.uri.ends_with("/media") {
            return (200, json!({"id": "1166846181421424"}));
        }
        let body = r.json();
        if body["status"] == "read" {
            return (200, json!({"success": true}));
        }
        if body["to"] == "34655555555" {
            return (
                400,
                json!({"error":{"message":"(#131047) Re-engagement message","type":"OAuthException","code":131047,
                       "error_data":{"messaging_product":"whatsapp","details":"Message failed to send because more than 24 hours have passed since the customer last replied to this number."},
                       "fbtrace_id":"AbCdEf"}}),
            );
        }
        let mut n = n.lock().unwrap();
        *n += 1;
        (
            200,
            json!({"messaging_product":"whatsapp",
                   "contacts":[{"input": body["to"], "wa_id": body["to"]}],
                   "messages":[{"id": format!("wamid.graph.{n}")}]}),
        )
    })
    .await
}

async fn relay(database: &str, graph: &str, config: &str) -> (Daemon, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bite-sync.toml");
    std::fs::write(&file, config).unwrap();
    let (daemon, url) = support::start_relay(&[
        ("DATABASE_URL", database.to_string()),
        ("WHATSAPP_VERIFY_TOKEN", "verify".to_string()),
        ("META_APP_SECRET", "app-secret".to_string()),
        ("WHATSAPP_ACCESS_TOKEN", TOKEN.to_string()),
        ("WHATSAPP_PHONE_NUMBER_ID", PHONE_ID.to_string()),
        ("GRAPH_API_URL", graph.to_string()),
        ("SYNC_API_KEY", API_KEY.to_string()),
        ("JWT_SECRET", JWT_SECRET.to_string()),
        ("BITE_CONFIG", file.display().to_string()),
    ])
    .await;
    (daemon, url, dir)
}

fn sent_to_graph(graph: &FakeHttp, edge: &str) -> Vec<Recorded> {
    graph.requests_to(&format!("/v21.0/{PHONE_ID}/{edge}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_written_for_metas_api_sends_through_the_relay() {
    let dir = tokio::task::spawn_blocking(client_dir).await.unwrap();
    let dbs = test_dbs("graph_client").await;
    let graph = graph().await;
    // No spacing per customer: the client's sends go one after another.
    let (relay_daemon, relay_url, _config) = relay(
        &dbs.mirror_url,
        &graph.url,
        "[relay]\ncustomer_interval = \"0s\"\n",
    )
    .await;
    let out = tokio::process::Command::new("node")
        .arg("client.mjs")
        .current_dir(dir)
        .env("RELAY_URL", &relay_url)
        .env("TOKEN", API_KEY)
        .env("PHONE_ID", PHONE_ID)
        .env("GRAPH_VERSION", "v21.0")
        .output()
        .await
        .expect("node runs");
    assert!(
        out.status.success(),
        "the client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay_daemon.log()
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("the client's JSON");

    // Meta's answers came back as Meta gave them.
    assert_eq!(got["text"]["status"], 200, "{got}");
    assert_eq!(got["text"]["body"]["messages"][0]["id"], "wamid.graph.1");
    assert_eq!(got["text"]["body"]["contacts"][0]["wa_id"], "34612345678");
    assert_eq!(
        got["template"]["body"]["messages"][0]["id"],
        "wamid.graph.2"
    );
    assert_eq!(got["read"]["body"], json!({"success": true}));
    assert_eq!(got["media"]["status"], 200, "{got}");
    assert_eq!(got["media"]["body"], json!({"id": "1166846181421424"}));
    assert_eq!(got["refused"]["status"], 400);
    assert_eq!(got["refused"]["thrown"], "HTTPError");
    assert_eq!(got["refused"]["body"]["error"]["code"], 131047);
    assert_eq!(got["refused"]["body"]["error"]["fbtrace_id"], "AbCdEf");
    // The relay's own refusals in Meta's envelope, with Meta's codes.
    assert_eq!(got["wrong_token"]["status"], 401, "{got}");
    assert_eq!(got["wrong_token"]["body"]["error"]["code"], 190);
    assert_eq!(got["other_number"]["status"], 400);
    assert_eq!(got["other_number"]["body"]["error"]["code"], 100);

    // Meta got the client's own bodies under the client's version, with the relay's token.
    let messages = sent_to_graph(&graph, "messages");
    assert_eq!(messages.len(), 4, "{:?}", graph.requests());
    for m in &messages {
        assert_eq!(
            m.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    assert_eq!(
        messages[0].json(),
        json!({"messaging_product":"whatsapp","recipient_type":"individual","to":"34612345678",
               "type":"text","text":{"preview_url":false,"body":"Tu pedido está listo"}})
    );
    assert_eq!(messages[1].json()["template"]["name"], "order_ready");
    assert_eq!(messages[2].json()["status"], "read");
    // The upload streamed through whole: same multipart body, same boundary.
    let media = sent_to_graph(&graph, "media");
    assert_eq!(media.len(), 1);
    assert_eq!(
        media[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let content_type = media[0].header("content-type").unwrap();
    assert!(
        content_type.starts_with("multipart/form-data; boundary="),
        "{content_type}"
    );
    let boundary = content_type.split("boundary=").nth(1).unwrap();
    let body = &media[0].body;
    assert!(body.len() > 2 * 1024 * 1024, "{}", body.len());
    let text = String::from_utf8_lossy(body);
    assert!(text.starts_with(&format!("--{boundary}")));
    assert!(text.contains("name=\"file\"; filename=\"menu.png\""));
    assert!(text.contains("name=\"messaging_product\"\r\n\r\nwhatsapp"));
    let start = body
        .windows(4)
        .position(|w| w == b"\x00\x01\x02\x03")
        .unwrap();
    assert!(
        body[start..start + 251]
            .iter()
            .enumerate()
            .all(|(i, b)| *b as usize == i)
    );

    // Every send is in the outbox (the upload sends nothing to anyone).
    let db = support::connect(&dbs.mirror_url).await;
    assert_eq!(
        strings(
            &db,
            "SELECT kind || ' ' || state FROM bite_sync.outbox ORDER BY id"
        )
        .await,
        ["text sent", "template sent", "read sent", "text failed"]
    );
    // Neither token reached the log.
    let log = relay_daemon.log();
    assert!(!log.contains(TOKEN) && !log.contains(API_KEY), "{log}");
}

/// The Graph-compatible endpoint shares the send slots, the outbox and Idempotency-Key with
/// `/api/messages`, takes a JWT, and sends a path without a version under GRAPH_API_VERSION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_sends_share_slots_keys_and_credentials_with_api_messages() {
    let dbs = test_dbs("graph_shared").await;
    let graph = graph().await;
    let (_daemon, url, _config) = relay(
        &dbs.mirror_url,
        &graph.url,
        "[relay]\ncustomer_interval = \"20s\"\n",
    )
    .await;
    let http = reqwest::Client::new();
    let text = |to: &str| json!({"messaging_product":"whatsapp","to": to,"type":"text","text":{"body":"hola"}});
    let (status, _) = {
        let r = http
            .post(format!("{url}/api/messages"))
            .header("x-api-key", API_KEY)
            .json(&json!({"type":"text","to":"34612345678","text":"hola"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200);
    // The same customer through the Graph endpoint: 20 s away, refused like Meta's pair limit.
    let r = http
        .post(format!("{url}/v25.0/{PHONE_ID}/messages"))
        .bearer_auth(API_KEY)
        .json(&text("34612345678"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], 131056, "{body}");
    assert_eq!(graph.requests().len(), 1);

    // A JWT, an Idempotency-Key and no version in the path.
    let jwt = sign_jwt(
        &json!({"sub":"backend","exp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600}),
        JWT_SECRET.as_bytes(),
    );
    let post = || {
        http.post(format!("{url}/{PHONE_ID}/messages"))
            .bearer_auth(&jwt)
            .header("idempotency-key", "graph-1")
            .json(&text("34699000111"))
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["messages"][0]["id"], "wamid.graph.2");
    let again = post().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let unversioned = graph.requests_to(&format!("/v25.0/{PHONE_ID}/messages"));
    assert_eq!(unversioned.len(), 2, "GRAPH_API_VERSION's default, v25.0");
    let db = support::connect(&dbs.mirror_url).await;
    assert_eq!(count(&db, "SELECT count(*) FROM bite_sync.outbox").await, 2);

    // A body that is not Meta's: Meta's invalid-parameter error, nothing sent.
    let r = http
        .post(format!("{url}/v25.0/{PHONE_ID}/messages"))
        .bearer_auth(API_KEY)
        .json(&json!({"messaging_product":"whatsapp","type":"text"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], 100);
    assert_eq!(graph.requests().len(), 2);
}
