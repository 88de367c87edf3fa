use clap::{Arg, ArgAction};

use super::*;

fn cli() -> Command {
    Command::new("flowtrace").subcommand(
        Command::new("agent")
            .arg(
                Arg::new("drain_interval_ms")
                    .long("drain-interval-ms")
                    .env("FT_TEST_DRAIN")
                    .default_value("1000"),
            )
            .arg(
                Arg::new("latency_sample")
                    .long("latency-sample")
                    .default_value("64"),
            )
            .arg(
                Arg::new("no_conntrack")
                    .long("no-conntrack")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("exclude")
                    .long("exclude-iface")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_parser(clap::value_parser!(std::path::PathBuf)),
            ),
    )
}

fn run(file: &str, argv: &[&str]) -> Result<Vec<String>> {
    let dir = std::env::temp_dir().join(format!("flowtrace-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.toml", argv.len()));
    std::fs::write(&path, file).unwrap();
    let mut args: Vec<OsString> = ["flowtrace", "agent", "--config"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(path.clone().into());
    args.extend(argv.iter().map(OsString::from));
    let cmd = cli();
    let m = cmd.clone().try_get_matches_from(args.clone()).unwrap();
    let out = with_file(&cmd, &m, args);
    let _ = std::fs::remove_file(&path);
    out.map(|v| {
        v[4..]
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    })
}

#[test]
fn the_file_fills_what_flags_left_at_their_default() {
    let added = run(
        "drain-interval-ms = 500\nlatency-sample = 16\nno-conntrack = true\nexclude-iface = [\"eth0\", \"eth1\"]\n",
        &["--latency-sample", "8"],
    )
    .unwrap();
    // The command line's --latency-sample 8 wins: the file's 16 is not appended.
    // Keys come in TOML's (sorted) order.
    assert_eq!(
        added,
        [
            "--latency-sample",
            "8",
            "--drain-interval-ms",
            "500",
            "--exclude-iface",
            "eth0",
            "--exclude-iface",
            "eth1",
            "--no-conntrack"
        ]
    );
}

#[test]
fn bad_files_are_refused_with_the_key_or_the_syntax_error() {
    let e = run("drain-intervall-ms = 5\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown setting `drain-intervall-ms`") && e.contains("long flag names"),
        "{e}"
    );
    let e = run("drain-interval-ms = \n", &[]).unwrap_err().to_string();
    assert!(e.contains("is not valid TOML"), "{e}");
    let e = run("no-conntrack = \"yes\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("switch"), "{e}");
    let e = run("config = \"/x\"\n", &[]).unwrap_err().to_string();
    assert!(e.contains("unknown setting `config`"), "{e}");
}

#[test]
fn a_missing_file_is_no_settings() {
    let cmd = cli();
    let args: Vec<OsString> = [
        "flowtrace",
        "agent",
        "--config",
        "/nonexistent/flowtrace.toml",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let m = cmd.clone().try_get_matches_from(args.clone()).unwrap();
    assert_eq!(with_file(&cmd, &m, args.clone()).unwrap(), args);
}
