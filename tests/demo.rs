//! `bite-sync demo`, the README's first command, through the real binary.

mod support;

use support::bite_sync;

#[test]
fn demo_syncs_the_sample_restaurant_and_leaves_nothing_running() {
    let out = bite_sync()
        .args(["demo", "--no-wait", "--customers", "300", "--orders", "900"])
        .output()
        .expect("bite-sync runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("synced 4 table(s)"), "{stdout}");
    assert!(stdout.contains("900 rows"), "{stdout}");
    assert!(
        stdout.contains("The mirror now has 10 VIP customers"),
        "{stdout}"
    );
    // The WhatsApp part: stored, delivered, answered by the AI while the backend is down.
    for step in [
        "relay answered 200",
        "the backend received it",
        "WhatsApp reply sent through the Graph API",
        "marked answered_by_ai = true",
        "received 2, delivered 2, pending 0, answered by AI 1",
    ] {
        assert!(stdout.contains(step), "{step} missing from:\n{stdout}");
    }
    assert!(
        stdout.contains("Done: nothing is left running."),
        "{stdout}"
    );
    // The connection strings it printed point at servers that are gone now.
    let url = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("psql '"))
        .and_then(|l| l.split('\'').next())
        .expect("the demo prints a psql command");
    let port: u16 = url
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("port in the printed URL");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the demo's server on port {port} still accepts connections"
    );
}

#[test]
fn demo_without_server_binaries_says_what_to_install() {
    let out = bite_sync()
        .args(["demo", "--no-wait"])
        .env("PG_BIN_DIR", "/nonexistent/postgresql/bin")
        .output()
        .expect("bite-sync runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apt-get install postgresql-15"), "{stderr}");
    assert!(stderr.contains("PG_BIN_DIR"), "{stderr}");
}
