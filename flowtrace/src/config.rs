//! The agent's optional config file: one model with its flags and environment variables.
//!
//! The file is TOML whose keys are the agent's long flag names (`drain-interval-ms = 500`,
//! `exclude-iface = ["eth0"]`, `no-conntrack = true`). A setting given on the command line
//! or in its `FLOWTRACE_*` environment variable wins over the file, and the file over the
//! built-in default: the file's settings are turned into flags and appended to the command
//! line only for the arguments the command line and environment left at their defaults, so
//! the file's values go through the same parsing and range checks as flags. A named file
//! that does not exist is warned about and ignored (an optional ConfigMap not created); one
//! that cannot be read or parsed stops the agent.

use std::{ffi::OsString, path::Path};

use clap::{parser::ValueSource, ArgMatches, Command};

use crate::error::{Error, Result};

/// The subcommands that run an agent and take `--config`.
const AGENT_COMMANDS: [&str; 2] = ["agent", "trace"];

/// `args` with the settings of the config file named by `--config`/`FLOWTRACE_CONFIG`
/// appended (unchanged when there is none). `cmd` is the whole CLI, `matches` the result
/// of parsing `args` with it.
pub fn with_file(
    cmd: &Command,
    matches: &ArgMatches,
    mut args: Vec<OsString>,
) -> Result<Vec<OsString>> {
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(args);
    };
    if !AGENT_COMMANDS.contains(&name) {
        return Ok(args);
    }
    let Some(path) = sub.get_one::<std::path::PathBuf>("config") else {
        return Ok(args);
    };
    let Some(sub_cmd) = cmd.find_subcommand(name) else {
        return Ok(args);
    };
    args.extend(file_args(sub_cmd, sub, path)?);
    Ok(args)
}

fn file_args(cmd: &Command, matches: &ArgMatches, path: &Path) -> Result<Vec<OsString>> {
    let bad = |what: String| Error::Config {
        path: path.display().to_string(),
        problem: what,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        // The DaemonSet names the file of an optional ConfigMap: without the ConfigMap the
        // agent runs on flags, environment and defaults, and says so.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "warning: the config file {} does not exist; running on flags, FLOWTRACE_* variables and defaults",
                path.display()
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(bad(format!("cannot be read: {e}"))),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e| bad(format!("is not valid TOML: {e}")))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
        else {
            return Err(bad(format!(
                "has an unknown setting `{key}`: the keys are the long flag names of `flowtrace {}` (see its --help), without the dashes",
                cmd.get_name()
            )));
        };
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = OsString::from(format!("--{key}"));
        let takes_value = arg.get_action().takes_values();
        let scalar = |v: &toml::Value| -> Result<String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(bad(format!(
                    "gives `{key}` a {} where a string, number or boolean is expected",
                    other.type_str()
                ))),
            }
        };
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    out.push(flag);
                }
            }
            _ if !takes_value => {
                return Err(bad(format!(
                    "gives `{key}` a {}; it is a switch: true or false",
                    value.type_str()
                )));
            }
            toml::Value::Array(items) => {
                for item in items {
                    out.push(flag.clone());
                    out.push(scalar(item)?.into());
                }
            }
            v => {
                out.push(flag);
                out.push(scalar(v)?.into());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
