//! `bite-sync demo`, the README's first command, through the real binary.

mod support;

use support::bite_sync;

/// The commands the demo invites the user to run: the indented `psql`, `bite-sync` and `curl`
/// lines after "Look around:".
fn printed_commands(stdout: &str) -> Vec<String> {
    stdout
        .split_once("\nLook around:\n")
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| {
            ["psql ", "bite-sync ", "curl "]
                .iter()
                .any(|c| l.starts_with(c))
        })
        .map(str::to_string)
        .collect()
}

/// Whether anything listens on TCP `port` at an address other than loopback (from
/// /proc/net/tcp and tcp6, where addresses are hex).
fn listens_beyond_loopback(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((address, hex_port)) = local.split_once(':') else {
                continue;
            };
            // 0A: listening.
            if *state != "0A" || u16::from_str_radix(hex_port, 16).ok() != Some(port) {
                continue;
            }
            let loopback = address == "0100007F" // 127.0.0.1
                || address == "00000000000000000000000001000000"; // ::1
            if !loopback {
                found.push(format!("{file}: {local}"));
            }
        }
    }
    found
}

#[test]
fn demo_syncs_the_sample_restaurant_every_printed_command_works_and_nothing_is_left() {
    use std::io::BufRead;
    let mut demo = bite_sync()
        .args(["demo", "--customers", "300", "--orders", "900"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bite-sync runs");
    let stderr = demo.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut text).ok();
        text
    });
    let mut lines = std::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    // Up to the prompt: the demo waits there, with everything still running.
    for line in lines.by_ref() {
        let line = line.expect("the demo's output");
        stdout.push_str(&line);
        stdout.push('\n');
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    assert!(
        stdout.contains("Press Ctrl-C"),
        "the demo did not get to its prompt\nstdout: {stdout}\nstderr: {}",
        stderr.join().unwrap()
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

    // The relay it says is on loopback listens on loopback only.
    let relay_port: u16 = stdout
        .split("Relay on http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .expect("the demo prints the relay's address");
    assert_eq!(
        listens_beyond_loopback(relay_port),
        Vec::<String>::new(),
        "the demo relay listens beyond loopback"
    );

    // Every command it invites the user to run works as printed, in order.
    let commands = printed_commands(&stdout);
    for wanted in [
        "bite-sync sync --source",
        "--tables menu_items --dry-run",
        "bite-sync status",
        "psql ",
        "curl ",
    ] {
        assert!(
            commands.iter().any(|c| c.contains(wanted)),
            "no printed command has {wanted:?}: {commands:#?}"
        );
    }
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bite-sync"))
        .parent()
        .unwrap()
        .to_path_buf();
    let pg_bin = bite_sync::pg::cluster::find_bin_dir().expect("PostgreSQL's binaries");
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        pg_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for command in &commands {
        // Where a user would type it: a fresh directory, none of the developer's BITE_*.
        let like_a_user = bite_sync();
        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", command])
            .current_dir(like_a_user.get_current_dir().unwrap())
            .env("PATH", &path)
            .stdin(std::process::Stdio::null());
        for (key, value) in like_a_user.get_envs() {
            match value {
                Some(v) => sh.env(key, v),
                None => sh.env_remove(key),
            };
        }
        let out = sh.output().expect("sh runs");
        assert!(
            out.status.success(),
            "the printed command failed ({}):\n  {command}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Ctrl-C stops and removes everything.
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(demo.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    for line in lines {
        stdout.push_str(&line.expect("the demo's output"));
        stdout.push('\n');
    }
    let status = demo.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        status.success(),
        "demo failed\nstdout: {stdout}\nstderr: {stderr}"
    );
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
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", relay_port)).is_err(),
        "the demo's relay on port {relay_port} still accepts connections"
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
