//! The Prometheus text exposition format as the agents serve it on `/metrics`: a reader for its
//! samples, and `promtool check metrics` (Debian package `prometheus`) as the independent judge
//! of whether the output is valid.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// `promtool check metrics` on `text`: (passed, what promtool printed).
pub fn promtool(text: &str) -> Result<(bool, String)> {
    let cmd = "promtool check metrics";
    let io = |what: &str| {
        let what = format!("{what} `{cmd}`");
        move |source| Error::Io { what, source }
    };
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: format!("{cmd} (Debian package `prometheus`; scripts/setup.sh installs it)"),
            source,
        })?;
    // Write on a thread: promtool may answer before it has read everything, and a large
    // exposition fills the pipe.
    let stdin = child.stdin.take();
    let input = text.to_string();
    let writer = std::thread::spawn(move || match stdin {
        Some(mut pipe) => pipe.write_all(input.as_bytes()),
        None => Ok(()),
    });
    let out = child.wait_with_output().map_err(io("waiting for"))?;
    writer
        .join()
        .map_err(|_| Error::Invalid(format!("the thread feeding `{cmd}` panicked")))?
        .map_err(io("writing the exposition to"))?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// One sample of the text format: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, with any `_bucket`/`_sum`/`_count`/`_total` suffix as exported.
    pub name: String,
    /// Label values, unescaped.
    pub labels: BTreeMap<String, String>,
    /// The sample's value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, or "" when the sample does not have it (as PromQL treats a
    /// missing label).
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
}

/// The samples of a text-format exposition (comments skipped; label values unescaped as the
/// format defines: `\\`, `\"`, `\n`). Fails naming the first line it cannot read.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            parse_line(line).ok_or_else(|| Error::Parse {
                cmd: "GET /metrics".into(),
                detail: format!("unreadable exposition line: {line}"),
            })
        })
        .collect()
}

/// One sample line: `name{k="v",...} value [timestamp]`.
fn parse_line(line: &str) -> Option<Sample> {
    let i = line.find(['{', ' '])?;
    let (name, rest) = (&line[..i], &line[i..]);
    let mut labels = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    if chars.peek() == Some(&'{') {
        chars.next();
        loop {
            match chars.peek()? {
                '}' => {
                    chars.next();
                    break;
                }
                ',' => {
                    chars.next();
                    continue;
                }
                _ => {}
            }
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if chars.next()? != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => match chars.next()? {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
    }
    let value: String = chars.collect();
    let value = value.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_labels_and_escapes_are_read() {
        let text = "# HELP x_total X.\n# TYPE x_total counter\n\
                    x_total{a=\"1\",b=\"q\\\"u\\\\o\\nte\"} 3\n\
                    up 1 1700000000000\n\
                    h_bucket{le=\"+Inf\"} 7\n";
        let s = parse_exposition(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].label("a"), "1");
        assert_eq!(s[0].label("b"), "q\"u\\o\nte");
        assert_eq!(s[0].label("missing"), "");
        assert_eq!(s[0].value, 3.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("up", 1.0));
        assert_eq!(s[2].label("le"), "+Inf");
    }

    #[test]
    fn unreadable_lines_are_named() {
        for bad in ["x{a=\"1\" 3", "x{a=1} 3", "x 3a", "novalue"] {
            let e = parse_exposition(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
