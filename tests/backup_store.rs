//! The backup store, against a folder and against a real S3 server (s3s-fs, in process, with
//! signature checks): every behaviour both backends share is one test run on each (the
//! `folder::` and `s3::` modules), then what only S3 has (multipart parts, credentials,
//! endpoints).

mod support;

use std::time::Duration;

use bite_sync::backup::store::{ObjectInfo, S3Settings, Store, StoreError, Written};
use sha2::{Digest, Sha256};
use support::{S3Server, wait_for};
use tokio::io::AsyncReadExt;

const MIB: usize = 1 << 20;

/// Where a store under test keeps its objects; dropping it removes them (and stops the
/// server).
enum Place {
    Folder(tempfile::TempDir),
    S3(S3Server),
}

/// A store under test, on either backend.
struct Backend {
    store: Store,
    place: Place,
}

impl Backend {
    async fn folder() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("file://{}", dir.path().join("backups").display());
        let store = Store::open(&url, &S3Settings::default())
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        Backend {
            store,
            place: Place::Folder(dir),
        }
    }

    async fn s3() -> Backend {
        let server = S3Server::start().await;
        let url = server.url("nightly");
        let store = Store::open(&url, &server.settings())
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        Backend {
            store,
            place: Place::S3(server),
        }
    }

    /// What unfinished writes leave behind: `.partial` files in the folder, multipart
    /// uploads on the server.
    fn leftovers(&self) -> usize {
        match &self.place {
            Place::Folder(dir) => count_partials(dir.path()),
            Place::S3(server) => server.pending_uploads(),
        }
    }
}

fn count_partials(dir: &std::path::Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir)
        .expect("read dir")
        .map(Result::unwrap)
    {
        let path = entry.path();
        if path.is_dir() {
            count += count_partials(&path);
        } else if path.extension().is_some_and(|e| e == "partial") {
            count += 1;
        }
    }
    count
}

/// Runs each named `async fn(Backend)` once on a folder (`folder::name`) and once on S3
/// (`s3::name`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod folder {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::folder().await).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::s3().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    put_then_get_round_trips,
    a_large_object_streams_through_in_parts,
    a_dropped_writer_leaves_nothing,
    list_shows_finished_objects_sorted_with_relative_keys,
    listing_follows_continuation_across_pages,
    deleted_and_missing_objects_are_not_found,
);

/// Reproducible bytes that do not compress or repeat (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn expected(data: &[u8]) -> Written {
    Written {
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(data)),
    }
}

/// Writes `data` through a writer in odd-sized chunks, so no write lines up with a part.
async fn write_in_odd_chunks(store: &Store, key: &str, data: &[u8]) -> Written {
    let mut writer = store.writer(key).await.expect("writer");
    let sizes = [1, 4093, 65_537, 1_000_003, 7, 3 * MIB + 11];
    let mut rest = data;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).min(rest.len()));
        writer.write(chunk).await.expect("write");
        rest = tail;
    }
    writer.finish().await.expect("finish")
}

async fn read_all(store: &Store, key: &str) -> Vec<u8> {
    let mut reader = store.reader(key).await.expect("reader");
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await.expect("read to end");
    out
}

fn keys(objects: &[ObjectInfo]) -> Vec<&str> {
    objects.iter().map(|o| o.key.as_str()).collect()
}

async fn put_then_get_round_trips(backend: Backend) {
    let store = &backend.store;
    let manifest = br#"{"format": 1, "tables": ["orders", "menu_items"]}"#;
    let written = store
        .put("20261129T060000Z/manifest.json", manifest)
        .await
        .expect("put");
    assert_eq!(written, expected(manifest));
    let back = store
        .get("20261129T060000Z/manifest.json")
        .await
        .expect("get");
    assert_eq!(&back[..], manifest);

    // An empty object is an object.
    assert_eq!(store.put("empty", b"").await.expect("put"), expected(b""));
    assert!(store.get("empty").await.expect("get").is_empty());

    // A second put replaces the first.
    store
        .put("20261129T060000Z/manifest.json", b"{}")
        .await
        .expect("put");
    assert_eq!(
        read_all(store, "20261129T060000Z/manifest.json").await,
        b"{}"
    );
}

async fn a_large_object_streams_through_in_parts(backend: Backend) {
    let store = &backend.store;
    let data = noise(20 * MIB + 12_345, 7);
    let written = write_in_odd_chunks(store, "20261129T060000Z/orders.copy.gz", &data).await;
    assert_eq!(written, expected(&data));

    let back = read_all(store, "20261129T060000Z/orders.copy.gz").await;
    assert!(back == data, "read back {} bytes that differ", back.len());
    let listed = store.list("").await.expect("list");
    assert_eq!(
        listed,
        vec![ObjectInfo {
            key: "20261129T060000Z/orders.copy.gz".to_owned(),
            size: data.len() as u64,
        }]
    );
    if let Place::S3(server) = &backend.place {
        // 8 + 8 + 4 MiB: S3 names a multipart object's ETag `<md5 of md5s>-<parts>`.
        let (head, _) = server
            .bucket()
            .head_object("nightly/20261129T060000Z/orders.copy.gz")
            .await
            .expect("head");
        let etag = head.e_tag.unwrap_or_default();
        assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");
        assert_eq!(server.pending_uploads(), 0);
    }
}

async fn a_dropped_writer_leaves_nothing(backend: Backend) {
    let store = &backend.store;
    let data = noise(9 * MIB, 11);
    let mut writer = store.writer("killed/orders.copy.gz").await.expect("writer");
    // More than a part, so S3 has an upload going with a part sent.
    writer.write(&data).await.expect("write");
    assert!(
        backend.leftovers() >= 1,
        "the write left no trace to clean up"
    );
    drop(writer);

    assert_eq!(store.list("").await.expect("list"), vec![]);
    assert!(matches!(
        store.get("killed/orders.copy.gz").await,
        Err(StoreError::NotFound { .. })
    ));
    wait_for(
        "the dropped writer's upload to be aborted",
        Duration::from_secs(10),
        || async { (backend.leftovers() == 0).then_some(()) },
    )
    .await;

    // The key is free for the next attempt.
    let written = write_in_odd_chunks(store, "killed/orders.copy.gz", &data).await;
    assert_eq!(written, expected(&data));
    assert!(read_all(store, "killed/orders.copy.gz").await == data);
}

async fn list_shows_finished_objects_sorted_with_relative_keys(backend: Backend) {
    let store = &backend.store;
    for key in ["b/2", "a/2", "a/10", "c", "a/1"] {
        store.put(key, key.as_bytes()).await.expect("put");
    }
    let mut unfinished = store.writer("a/3").await.expect("writer");
    unfinished.write(b"not yet").await.expect("write");

    let all = store.list("").await.expect("list");
    assert_eq!(keys(&all), ["a/1", "a/10", "a/2", "b/2", "c"]);
    assert_eq!(all[1].size, 4);
    let under_a = store.list("a/").await.expect("list a/");
    assert_eq!(keys(&under_a), ["a/1", "a/10", "a/2"]);
    assert_eq!(
        keys(&store.list("a/1").await.expect("list")),
        ["a/1", "a/10"]
    );
    assert_eq!(store.list("z").await.expect("list"), vec![]);

    unfinished.finish().await.expect("finish");
    let under_a = store.list("a/").await.expect("list a/");
    assert_eq!(keys(&under_a), ["a/1", "a/10", "a/2", "a/3"]);
}

async fn listing_follows_continuation_across_pages(backend: Backend) {
    let store = backend.store.clone().with_list_page_size(7);
    let mut expected_keys = Vec::new();
    for i in 0..25 {
        let key = format!("20261129T{i:06}Z/manifest.json");
        store.put(&key, b"{}").await.expect("put");
        expected_keys.push(key);
    }
    let listed = store.list("").await.expect("list");
    assert_eq!(keys(&listed), expected_keys);
    // A prefix that ends inside a page.
    let some = store.list("20261129T00001").await.expect("list");
    assert_eq!(keys(&some), expected_keys[10..20]);
}

async fn deleted_and_missing_objects_are_not_found(backend: Backend) {
    let store = &backend.store;
    store.put("old/manifest.json", b"{}").await.expect("put");
    store.delete("old/manifest.json").await.expect("delete");
    match store.get("old/manifest.json").await {
        Err(StoreError::NotFound { store: shown, key }) => {
            assert_eq!(shown, store.describe());
            assert_eq!(key, "old/manifest.json");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        store.reader("old/manifest.json").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list("").await.expect("list"), vec![]);
    // Deleting what is gone is not an error: retention may run twice.
    store
        .delete("old/manifest.json")
        .await
        .expect("delete again");
    store.delete("never/existed").await.expect("delete missing");
}

#[tokio::test]
async fn bad_urls_say_what_is_expected() {
    let cases = [
        ("s3://", "needs a bucket"),
        ("s3:///prefix", "needs a bucket"),
        ("ftp://x", "expected file:///dir or s3://bucket"),
        ("file://relative/dir", "absolute path"),
        ("s3://127.0.0.1:9000/backups", "endpoint"),
        ("s3://AKIAEXAMPLE:hunter2secret@backups/x", "credentials"),
    ];
    for (url, expected) in cases {
        match Store::open(url, &S3Settings::default()).await {
            Err(error @ StoreError::BadUrl { .. }) => {
                let message = error.to_string();
                assert!(message.contains(expected), "{url}: {message}");
                assert!(!message.contains("hunter2secret"), "{message}");
                assert!(!format!("{error:?}").contains("hunter2secret"));
            }
            other => panic!("{url}: expected BadUrl, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn s3_describe_names_bucket_prefix_and_endpoint() {
    let server = S3Server::start().await;
    for (url, shown) in [
        (server.url("nightly/"), "s3://backups/nightly"),
        (server.url("a//b"), "s3://backups/a/b"),
        ("s3://backups".to_owned(), "s3://backups"),
    ] {
        let store = Store::open(&url, &server.settings()).await.expect("open");
        let expected = format!("{shown} (endpoint {})", server.endpoint());
        assert_eq!(store.describe(), expected);
        assert!(!format!("{store:?}").contains(S3Server::SECRET_KEY));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_part_boundaries_are_exact() {
    let backend = Backend::s3().await;
    let Place::S3(server) = &backend.place else {
        unreachable!()
    };
    let bucket = server.bucket();
    // Exactly one part's worth is one plain object; one byte more is two parts.
    for (len, parts) in [(8 * MIB, None), (8 * MIB + 1, Some("-2"))] {
        let data = noise(len, len as u64);
        let key = format!("part-test-{len}");
        let written = write_in_odd_chunks(&backend.store, &key, &data).await;
        assert_eq!(written, expected(&data));
        assert!(backend.store.get(&key).await.expect("get") == data);
        let (head, _) = bucket
            .head_object(format!("nightly/{key}"))
            .await
            .expect("head");
        let etag = head.e_tag.unwrap_or_default();
        let etag = etag.trim_matches('"');
        match parts {
            None => assert!(!etag.contains('-'), "{len} bytes: ETag {etag}"),
            Some(suffix) => assert!(etag.ends_with(suffix), "{len} bytes: ETag {etag}"),
        }
    }
}

#[tokio::test]
async fn s3_list_skips_folder_markers_and_other_prefixes() {
    let backend = Backend::s3().await;
    let Place::S3(server) = &backend.place else {
        unreachable!()
    };
    let bucket = server.bucket();
    // What a console's "create folder" makes, and neighbours outside the store's prefix.
    bucket
        .put_object("nightly/20261129T060000Z/", b"")
        .await
        .expect("marker");
    bucket
        .put_object("nightly-old/manifest.json", b"{}")
        .await
        .expect("put");
    bucket
        .put_object("other/manifest.json", b"{}")
        .await
        .expect("put");
    backend
        .store
        .put("20261129T060000Z/manifest.json", b"{}")
        .await
        .expect("put");

    let listed = backend.store.list("").await.expect("list");
    assert_eq!(keys(&listed), ["20261129T060000Z/manifest.json"]);
}

#[tokio::test]
async fn s3_wrong_secret_is_refused_without_showing_it() {
    let server = S3Server::start().await;
    let secret = "wrong-secret-do-not-show-7f3a";
    let settings = S3Settings {
        secret_key: Some(secret.to_owned()),
        ..server.settings()
    };
    let store = Store::open(&server.url("nightly"), &settings)
        .await
        .expect("open makes no request");

    let mut writer = store.writer("big").await.expect("writer");
    let big_write = writer.write(&noise(9 * MIB, 3)).await;
    let errors = [
        store.put("manifest.json", b"{}").await.map(drop),
        store.get("manifest.json").await.map(drop),
        store.reader("manifest.json").await.map(drop),
        store.list("").await.map(drop),
        store.delete("manifest.json").await,
        big_write,
    ];
    for result in errors {
        let error = result.expect_err("a wrong secret is refused");
        assert!(
            matches!(error, StoreError::S3 { .. }),
            "not an S3 error: {error:?}"
        );
        let message = error.to_string();
        assert!(message.starts_with(&store.describe()), "{message}");
        assert!(message.contains("SignatureDoesNotMatch"), "{message}");
        assert!(message.contains("check the secret key"), "{message}");
        for shown in [message, format!("{error:?}")] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
    assert_eq!(server.pending_uploads(), 0);
}

#[tokio::test]
async fn s3_missing_credentials_name_what_to_set() {
    let server = S3Server::start().await;
    let settings = S3Settings {
        endpoint: Some(server.endpoint()),
        ..S3Settings::default()
    };
    let error = Store::open_with_env(&server.url("nightly"), &settings, |_| None)
        .await
        .expect_err("no credentials anywhere");
    assert!(matches!(error, StoreError::Settings { .. }), "{error:?}");
    let message = error.to_string();
    for needed in [
        "s3://backups/nightly",
        "[backup] access_key",
        "secret_key",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(message.contains(needed), "{message}");
    }
}

#[tokio::test]
async fn s3_credentials_and_endpoint_come_from_the_environment() {
    let server = S3Server::start().await;
    let endpoint = server.endpoint();
    let env = |name: &str| match name {
        "AWS_ACCESS_KEY_ID" => Some(S3Server::ACCESS_KEY.to_owned()),
        "AWS_SECRET_ACCESS_KEY" => Some(S3Server::SECRET_KEY.to_owned()),
        "AWS_ENDPOINT_URL" => Some(endpoint.clone()),
        "AWS_REGION" => Some("us-east-1".to_owned()),
        _ => None,
    };
    let settings = S3Settings {
        ..S3Settings::default()
    };
    let store = Store::open_with_env(&server.url("nightly"), &settings, env)
        .await
        .expect("open");
    assert_eq!(
        store.describe(),
        format!("s3://backups/nightly (endpoint {endpoint})")
    );
    store.put("manifest.json", b"{}").await.expect("put");
    assert_eq!(&store.get("manifest.json").await.expect("get")[..], b"{}");
}

/// A store whose endpoint is a port nothing listens on.
async fn unreachable_store() -> Store {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let settings = S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        access_key: Some("a".to_owned()),
        secret_key: Some("s".to_owned()),
        ..S3Settings::default()
    };
    Store::open("s3://backups/nightly", &settings)
        .await
        .expect("open makes no request")
}

#[tokio::test]
async fn s3_unreachable_endpoint_fails_fast_and_clearly() {
    let store = unreachable_store().await;
    let attempts = async {
        [
            store.put("manifest.json", b"{}").await.map(drop),
            store.get("manifest.json").await.map(drop),
            store.list("").await.map(drop),
        ]
    };
    let results = tokio::time::timeout(Duration::from_secs(30), attempts)
        .await
        .expect("a refused connection fails instead of hanging");
    for result in results {
        let message = result.expect_err("nothing listens").to_string();
        assert!(message.starts_with(&store.describe()), "{message}");
        assert!(message.contains("Connection refused"), "{message}");
    }
}

#[tokio::test]
async fn s3_silent_endpoint_times_out() {
    // Accepts connections and never answers, like a firewall that drops packets.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let settings = S3Settings {
        endpoint: Some(format!("http://{addr}")),
        access_key: Some("a".to_owned()),
        secret_key: Some("s".to_owned()),
        ..S3Settings::default()
    };
    let store = Store::open("s3://backups/nightly", &settings)
        .await
        .expect("open")
        .with_request_timeout(Duration::from_millis(300));
    let attempts = async {
        [
            store.put("manifest.json", b"{}").await.map(drop),
            store.get("manifest.json").await.map(drop),
            store.reader("manifest.json").await.map(drop),
            store.list("").await.map(drop),
        ]
    };
    let results = tokio::time::timeout(Duration::from_secs(30), attempts)
        .await
        .expect("the request timeout ends every request");
    for result in results {
        let message = result.expect_err("nothing answers").to_string();
        assert!(message.starts_with(&store.describe()), "{message}");
        assert!(message.contains("no answer within 300ms"), "{message}");
    }
    silent.abort();
}

#[tokio::test]
async fn s3_missing_bucket_is_not_a_missing_key() {
    let server = S3Server::start().await;
    let store = Store::open("s3://no-such-bucket/nightly", &server.settings())
        .await
        .expect("open");
    // s3s-fs answers a read from a missing bucket with NoSuchKey (S3 says NoSuchBucket), so
    // only the calls it checks the bucket for are tried here.
    let results = [
        store.delete("manifest.json").await,
        store.list("").await.map(drop),
    ];
    for result in results {
        match result {
            Err(error @ StoreError::S3 { .. }) => {
                let message = error.to_string();
                assert!(message.contains("NoSuchBucket"), "{message}");
                assert!(message.contains("check the bucket name"), "{message}");
            }
            other => panic!("expected an S3 error, got {other:?}"),
        }
    }
}

/// MinIO in the back office is reached by IP or as `localhost`: such an endpoint works
/// without `path_style`, as with the AWS SDKs (a bucket cannot be a subdomain of an IP).
#[tokio::test]
async fn s3_ip_and_localhost_endpoints_need_no_path_style_setting() {
    let v4 = S3Server::start().await;
    let v6 = S3Server::start_on(std::net::Ipv6Addr::LOCALHOST.into()).await;
    let endpoints = [
        (&v4, v4.endpoint()),
        (&v4, format!("http://localhost:{}", v4.port())),
        (&v6, v6.endpoint()),
    ];
    for (server, endpoint) in endpoints {
        // Everything but the addressing style, which is left to bite-sync.
        let settings = S3Settings {
            endpoint: Some(endpoint.clone()),
            region: Some("us-east-1".to_owned()),
            access_key: Some(S3Server::ACCESS_KEY.to_owned()),
            secret_key: Some(S3Server::SECRET_KEY.to_owned()),
            ..S3Settings::default()
        };
        let store = Store::open(&server.url("office"), &settings)
            .await
            .unwrap_or_else(|e| panic!("open with {endpoint}: {e}"));
        let key = format!("probe-{}", endpoint.len());
        store
            .put(&key, b"hola")
            .await
            .unwrap_or_else(|e| panic!("put with {endpoint}: {e}"));
        assert_eq!(&store.get(&key).await.expect("get")[..], b"hola");
        assert!(
            store
                .list("")
                .await
                .expect("list")
                .iter()
                .any(|o| o.key == key),
            "{endpoint}"
        );
    }
}
