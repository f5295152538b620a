//! `bite-sync bench replication`, `backup` and `relay` through the real binary, at a size
//! small enough for CI: every step runs, every check passes, and the summary names each
//! measure with its target. The numbers themselves are the benchmark's business, not this
//! test's; that the relay lost nothing is this test's business.

mod support;

use support::bite_sync;

#[test]
fn bench_replication_runs_every_step_and_prints_its_targets() {
    let out = bite_sync()
        .args([
            "bench",
            "replication",
            "--customers",
            "100",
            "--orders",
            "1000",
            "--transactions",
            "200",
            "--duration",
            "2s",
            "--big-rows",
            "10000",
        ])
        .output()
        .expect("bite-sync runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench replication failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "each backlog 200 transactions = 1000 row changes",
        "1  native subscription, backlog catch-up",
        "1  bite-sync run, backlog catch-up",
        "2  bite-sync run, mirror 50 ms away each way",
        "3  bite-sync run, pgbench -c 2 at ",
        "4  bite-sync run, one 10000-row transaction",
        "bite-sync/native = ",
        "(target >= 1.5: ",
        "WAN = ",
        "(target >= 5000: ",
        "lag p99 = ",
        "(target <= 1: ",
        "peak RSS = ",
        "(target <= 64: ",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{stdout}");
    }
}

#[test]
fn bench_replication_json_has_every_measure() {
    let out = bite_sync()
        .args([
            "bench",
            "replication",
            "--customers",
            "50",
            "--orders",
            "200",
            "--transactions",
            "50",
            "--duration",
            "1s",
            "--big-rows",
            "1000",
            "--wan-delay",
            "10ms",
            "--json",
        ])
        .output()
        .expect("bite-sync runs");
    assert!(
        out.status.success(),
        "bench replication --json failed\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    for step in ["native", "bite_sync", "wan", "big"] {
        let seconds = report[step]["seconds"].as_f64().unwrap_or(0.0);
        assert!(seconds > 0.0, "{step}: {report}");
    }
    assert_eq!(report["bite_sync"]["row_changes"], 250, "{report}");
    assert_eq!(report["big"]["row_changes"], 1000, "{report}");
    assert!(
        report["steady"]["samples"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
    assert!(
        report["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
}

#[test]
fn bench_backup_runs_every_step_and_prints_its_targets() {
    let out = bite_sync()
        .args([
            "bench",
            "backup",
            "--customers",
            "100",
            "--orders",
            "1000",
            "--json",
        ])
        .output()
        .expect("bite-sync runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench backup failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    for key in [
        "a_pg_dump_gzip",
        "b_bite_sync_backup",
        "c_gunzip_psql",
        "d_bite_sync_restore",
        "backup_time_ratio",
        "backup_size_ratio",
        "restore_time_ratio",
        "peak_rss_mib",
    ] {
        assert!(!report[key].is_null(), "no {key} in {report}");
    }
    assert!(report["b_mib"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_relay_loses_nothing_and_reports_every_measure() {
    let out = bite_sync()
        .args([
            "bench",
            "relay",
            "--rate",
            "40",
            "--duration",
            "2s",
            "--peak-duration",
            "1s",
            "--connections",
            "8",
            "--json",
        ])
        .output()
        .expect("bite-sync runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench relay failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    // The same 80 webhooks went to the no-op handler and to the relay, all answered 200.
    for phase in ["noop", "relay"] {
        let load = &report[phase];
        assert_eq!(load["webhooks"], 80, "{phase}: {report}");
        assert_eq!(load["acknowledged"], 80, "{phase}: {report}");
        assert_eq!(load["other_status"], 0, "{phase}: {report}");
        assert_eq!(load["transport_errors"], 0, "{phase}: {report}");
        let p50 = load["latency"]["p50_ms"].as_f64().unwrap_or(0.0);
        let p99 = load["latency"]["p99_ms"].as_f64().unwrap_or(0.0);
        assert!(p50 > 0.0 && p50 <= p99, "{phase}: {report}");
    }
    // Several items per webhook on average, every one of them in the inbox: zero lost.
    let items = report["relay"]["items"].as_i64().unwrap_or(0);
    assert!(items > 80, "{report}");
    assert_eq!(report["relay_inbox_rows"].as_i64(), Some(items), "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["dead_letters"], 0, "{report}");
    // The closed loop: everything sent was acknowledged and stored.
    let peak = &report["peak"];
    assert!(peak["webhooks"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(peak["acknowledged"], peak["webhooks"], "{report}");
    assert_eq!(report["peak_inbox_rows"], peak["items"], "{report}");
    assert_eq!(report["peak_all_stored"], true, "{report}");
    assert!(
        peak["acknowledged_per_second"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    let rss = report["peak_rss_mib"].as_f64().unwrap_or(0.0);
    assert!(
        rss > 0.0 && rss >= report["relay_rss_after_b_mib"].as_f64().unwrap_or(f64::MAX),
        "{report}"
    );
    // D: every large forged body refused, and the fresh relay's memory measured.
    let bodies = &report["bodies"];
    assert_eq!(bodies["refused"], 30, "{report}");
    assert_eq!(bodies["other_status"], 0, "{report}");
    assert_eq!(bodies["transport_errors"], 0, "{report}");
    let peak = bodies["peak_rss_mib"].as_f64().unwrap_or(0.0);
    assert!(
        peak > 0.0 && peak >= bodies["rss_before_mib"].as_f64().unwrap_or(f64::MAX),
        "{report}"
    );
    assert!(
        bodies["rss_after_mib"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
}
