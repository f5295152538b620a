//! The Railway deployment agrees with the relay. `.railway/railway.ts` (Railway's
//! Infrastructure as Code) is type-checked with `tsc` against Railway's SDK (the `railway`
//! package on npm, pinned in `.railway/package-lock.json`) and run with that SDK the way
//! Railway's CLI runs it, and what it declares is checked against the relay's code: the
//! service is built from this repository's Dockerfile, its health check is the relay's health
//! route, `DATABASE_URL` references the Postgres it declares, and its variables are exactly
//! the ones the relay reads (secrets kept in Railway, never written in the file). The image
//! runs `bite-sync relay` as a non-root user. (There is no Docker engine or Railway account
//! here; these catch the mistakes that would only show on Railway.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use bite_sync::relay::settings::{RawDelivery, RawRelay, RelaySettings};
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn repo_file(name: &str) -> String {
    let path = repo().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn railway_dir() -> PathBuf {
    repo().join(".railway")
}

/// Runs `program` in `.railway/`, failing with its output when it fails.
fn run_in_railway_dir(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(railway_dir())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): install Node.js and npm (`bash .ci/run` does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{program} {} failed:\n{text}",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Railway's SDK and TypeScript as `.railway/package-lock.json` pins them (installed once;
/// `.ci/run` installs them before the tests).
fn sdk_installed() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        if !railway_dir()
            .join("node_modules/railway/package.json")
            .exists()
        {
            run_in_railway_dir("npm", &["ci", "--no-audit", "--no-fund"]);
        }
    });
}

/// What Railway's CLI does with the file (it evaluates the module and calls its default
/// export with a context and the SDK's `project`), printed as JSON. `tsx`, which the SDK
/// depends on, strips the types.
const EVALUATE: &str = r#"
import { createRailwayContext, project } from "railway/iac";
const [file, environment] = process.argv.slice(1);
const program = (await import(file)).default;
const definition = await program(createRailwayContext({ command: "plan", environment }), project);
process.stdout.write(JSON.stringify(definition));
"#;

/// The project `.railway/railway.ts` declares for `environment`.
fn declared(environment: &str) -> Value {
    sdk_installed();
    let file = format!("file://{}", railway_dir().join("railway.ts").display());
    let json = run_in_railway_dir(
        "node",
        &[
            "--import",
            "tsx",
            "--input-type=module",
            "-e",
            EVALUATE,
            &file,
            environment,
        ],
    );
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"))
}

fn resources<'a>(project: &'a Value, kind: &str) -> Vec<&'a Value> {
    project["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter(|r| r["type"] == kind)
        .collect()
}

/// Every environment variable the relay's settings read, found by running the relay's own
/// settings code and recording what it asks for; names asked only when another is set (a
/// provider's model once its key is there) are found by asking again with those set.
fn relay_variables() -> BTreeSet<String> {
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        let asked = std::cell::RefCell::new(BTreeSet::new());
        let env = |name: &str| {
            asked.borrow_mut().insert(name.to_string());
            known.contains(name).then(|| "x".to_string())
        };
        let _ = RelaySettings::resolve(&RawRelay::default(), &RawDelivery::default(), None, &env);
        let asked = asked.into_inner();
        if asked.is_subset(&known) {
            break;
        }
        known.extend(asked);
    }
    // Read by bite-sync for every command, the relay's signature alerts included.
    known.insert(bite_sync::config::ALERT_WEBHOOK_VAR.to_string());
    known
}

/// Railway sets these itself (the SDK's `RailwayProvidedVariable`), so the file must not.
fn provided_by_railway(name: &str) -> bool {
    name == "PORT" || name.starts_with("RAILWAY_")
}

#[test]
fn railway_ts_type_checks_against_railways_sdk() {
    sdk_installed();
    run_in_railway_dir("npx", &["--no-install", "tsc", "-p", "tsconfig.json"]);
}

#[test]
fn railway_ts_builds_the_relay_from_the_dockerfile_with_its_health_check_and_replicas() {
    let production = declared("production");
    let services = resources(&production, "service");
    assert_eq!(services.len(), 1, "one service, the relay: {production:#}");
    let relay = services[0];
    assert_eq!(relay["build"]["builder"], "DOCKERFILE", "{relay:#}");
    let dockerfile = relay["build"]["dockerfilePath"]
        .as_str()
        .expect("a Dockerfile path");
    assert!(repo().join(dockerfile).is_file(), "{dockerfile}");
    let deploy = &relay["deploy"];
    assert_eq!(
        deploy["healthcheckPath"],
        bite_sync::relay::server::HEALTH_PATH
    );
    assert!(
        deploy["healthcheckTimeout"].as_i64().unwrap_or(0) >= 30,
        "{deploy:#}"
    );
    // The image's command is `bite-sync relay`, which reads PORT itself: a start command
    // would replace it.
    assert!(deploy.get("startCommand").is_none(), "{deploy:#}");
    // Replicas coordinate through Postgres, so production runs more than one.
    assert!(
        deploy["numReplicas"].as_i64().unwrap_or(0) >= 2,
        "{deploy:#}"
    );
    let staging = declared("staging");
    assert_eq!(
        resources(&staging, "service")[0]["deploy"]["numReplicas"],
        1
    );
}

#[test]
fn railway_ts_declares_every_variable_the_relay_reads_and_no_secret() {
    let project = declared("production");
    let databases = resources(&project, "database");
    assert_eq!(databases.len(), 1, "{project:#}");
    let postgres = databases[0];
    assert_eq!(postgres["engine"], "postgres");
    let relay = resources(&project, "service")[0];
    let variables = relay["variables"].as_object().expect("variables");

    assert_eq!(
        variables["DATABASE_URL"],
        serde_json::json!({
            "type": "reference",
            "resource": postgres["address"],
            "output": "DATABASE_URL"
        }),
        "DATABASE_URL is the declared Postgres's"
    );

    let expected: BTreeSet<String> = relay_variables()
        .into_iter()
        .filter(|name| !provided_by_railway(name))
        .collect();
    let declared: BTreeSet<String> = variables.keys().cloned().collect();
    assert_eq!(
        declared,
        expected,
        "missing: {:?}; not read by the relay: {:?}",
        expected.difference(&declared).collect::<Vec<_>>(),
        declared.difference(&expected).collect::<Vec<_>>()
    );

    // Secrets are kept in Railway (preserve) or referenced, never written in the file; so
    // is anything that may carry one (a URL can hold a password or a token).
    for (name, value) in variables {
        let kind = value["type"].as_str().unwrap_or("");
        let may_be_secret = ["SECRET", "TOKEN", "KEY", "PASSWORD", "URL", "WEBHOOK"]
            .iter()
            .any(|word| name.contains(word));
        assert!(
            matches!(kind, "preserve" | "reference" | "sharedReference")
                || (!may_be_secret && kind == "literal"),
            "{name} = {value}: a secret must be preserve() or a reference"
        );
    }
}

#[test]
fn railway_toml_is_gone_so_railway_reads_only_railway_ts() {
    // Railway stopped reading railway.toml / railway.json on 2026-12-01, and a service
    // managed by one of them cannot be managed by .railway/railway.ts.
    for old in ["railway.toml", "railway.json"] {
        assert!(!repo().join(old).exists(), "{old} is still there");
    }
}

#[test]
fn the_image_is_multi_stage_and_runs_the_relay_as_a_non_root_user() {
    let dockerfile = repo_file("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let stages = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    let last_stage = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let runtime = &lines[last_stage..];
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("COPY --from=build") && l.contains("bite-sync"))
    );
    assert!(runtime.contains(&"CMD [\"relay\"]"));
    assert!(runtime.contains(&"EXPOSE 5000") && runtime.contains(&"ENV PORT=5000"));
    assert!(
        dockerfile.contains("--locked"),
        "the image builds what Cargo.lock says"
    );
}

#[test]
fn the_image_does_not_ship_the_railway_sdk() {
    let ignored = repo_file(".dockerignore");
    assert!(
        ignored
            .lines()
            .any(|l| l.trim() == ".railway/node_modules/"),
        "{ignored}"
    );
}

#[test]
fn the_relay_variables_are_found_in_the_code() {
    let names = relay_variables();
    for name in [
        "DATABASE_URL",
        "WHATSAPP_VERIFY_TOKEN",
        "META_APP_SECRET",
        "OPENAI_MODEL",
        "SYNC_API_KEY",
    ] {
        assert!(names.contains(name), "{name} not in {names:?}");
    }
}
