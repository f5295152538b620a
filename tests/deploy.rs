//! The Railway deployment files agree with the relay: the health check is the relay's health
//! route, the image runs `bite-sync relay` as a non-root user, the port is the relay's default.
//! (There is no Docker engine here to build the image; these catch the mistakes that would
//! only show on Railway.)

use std::path::Path;

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn railway_toml_builds_the_dockerfile_and_checks_the_relays_health_route() {
    let railway: toml::Value = toml::from_str(&repo_file("railway.toml")).unwrap();
    assert_eq!(railway["build"]["builder"].as_str(), Some("DOCKERFILE"));
    let dockerfile = railway["build"]["dockerfilePath"].as_str().unwrap();
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(dockerfile)
            .exists()
    );
    let deploy = &railway["deploy"];
    assert_eq!(
        deploy["healthcheckPath"].as_str(),
        Some(bite_sync::relay::server::HEALTH_PATH)
    );
    assert!(deploy["healthcheckTimeout"].as_integer().unwrap() >= 30);
    assert!(matches!(
        deploy["restartPolicyType"].as_str(),
        Some("ON_FAILURE" | "ALWAYS")
    ));
    // An exec-form startCommand would not expand $PORT; the relay reads PORT itself, so the
    // image's command is used.
    assert!(deploy.get("startCommand").is_none());
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
