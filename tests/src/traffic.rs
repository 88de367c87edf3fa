//! Driving `ftgen` inside pods from tests and tools, with structured (JSON) results.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{netns::ChildGuard, Error, Pod, Result};

/// Path of the `ftgen` binary built beside the running test or tool, or `$FTGEN_BIN`.
pub fn ftgen_bin() -> Result<PathBuf> {
    crate::agent::sibling_binary("ftgen", "FTGEN_BIN", "flowtrace-tests")
}

fn parse(stdout: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(stdout).map_err(|e| {
        Error::Invalid(format!(
            "ftgen {what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(stdout)
        ))
    })
}

/// Runs `ftgen <args>` in `pod` to completion and returns its JSON result.
pub fn ftgen(pod: &Pod, args: &[&str]) -> Result<Value> {
    let bin = ftgen_bin()?;
    let bin = bin.to_string_lossy().to_string();
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    let out = pod.exec(&argv)?;
    parse(&out.stdout, args.first().copied().unwrap_or(""))
}

/// Starts `ftgen <args> --ready-file F` in `pod` and returns once its socket is bound.
pub fn ftgen_bg(pod: &Pod, args: &[&str]) -> Result<ChildGuard> {
    ftgen_bg_in(&pod.netns, args)
}

/// Starts `ftgen <args> --ready-file F` in network namespace `netns_name` and returns once
/// it is ready.
pub fn ftgen_bg_in(netns_name: &str, args: &[&str]) -> Result<ChildGuard> {
    let bin = ftgen_bin()?;
    let bin = bin.to_string_lossy().to_string();
    let what = args.first().copied().unwrap_or("ftgen");
    let ready =
        std::env::temp_dir().join(format!("{netns_name}-{what}-{}.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let ready_s = ready.to_string_lossy().to_string();
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--ready-file", &ready_s]);
    let mut guard = crate::netns::ChildGuard::new(
        crate::netns::spawn(netns_name, &argv)?,
        format!("{} (in {netns_name})", crate::netns::display_cmd(&argv)),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if guard.has_exited() {
            return Err(Error::Invalid(format!(
                "ftgen {args:?} in {netns_name} exited before becoming ready"
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "ftgen {args:?} in {netns_name} never became ready"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&ready);
    Ok(guard)
}

/// Waits for a background ftgen and returns its JSON result.
pub fn finish(guard: ChildGuard) -> Result<Value> {
    let out = guard.wait_output(Duration::from_secs(60))?;
    parse(&out.stdout, "background")
}
