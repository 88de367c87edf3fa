//! A real Prometheus server (Debian's `prometheus` package) started by a test inside a node
//! namespace, scraping agents every second and, given rule files, evaluating them every
//! second; read back through its HTTP API.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{in_netns, ChildGuard, Error, Result};

/// The server's port on the loopback of the namespace it runs in.
pub const PROM_PORT: u16 = 9091;

/// A Prometheus server in a namespace, its configuration and data in a fresh temporary
/// directory removed on drop (after the server is killed).
pub struct Prometheus {
    _guard: ChildGuard,
    dir: PathBuf,
    netns: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// A Prometheus in `netns` scraping `targets` (address, `node` label) every second, job
    /// `flowtrace` (the job name the ServiceMonitor gives the agents).
    pub fn start(netns: &str, targets: &[(String, &str)]) -> Result<Prometheus> {
        Self::start_with_rules(netns, targets, &[])
    }

    /// [`Prometheus::start`] that also loads `rules` (file name, content) and evaluates them
    /// every second.
    pub fn start_with_rules(
        netns: &str,
        targets: &[(String, &str)],
        rules: &[(&str, String)],
    ) -> Result<Prometheus> {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "flowtrace-prom-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |what: String| move |source| Error::Io { what, source };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))
            .map_err(io(format!("creating {}", dir.display())))?;
        let mut cfg = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n",
        );
        if !rules.is_empty() {
            cfg += "rule_files:\n";
            for (name, text) in rules {
                let path = dir.join(name);
                std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
                cfg += &format!("  - '{}'\n", path.display());
            }
        }
        cfg += "scrape_configs:\n  - job_name: flowtrace\n    static_configs:\n";
        for (addr, node) in targets {
            cfg +=
                &format!("      - targets: ['{addr}']\n        labels:\n          node: {node}\n");
        }
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, cfg).map_err(io(format!("writing {}", config.display())))?;
        let log = dir.join("log");
        let log_file =
            std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: format!(
                    "ip netns exec {netns} prometheus (Debian package `prometheus`; scripts/setup.sh installs it)"
                ),
                source,
            })?;
        Ok(Prometheus {
            _guard: ChildGuard::new(child, format!("prometheus in {netns}")),
            dir,
            netns: netns.to_string(),
        })
    }

    /// `GET /api/v1/<path>` with `query` parameters: the answer's `data`, or `None` while the
    /// server does not answer (starting) or answers an error.
    pub fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Option<Value>> {
        let url = format!("http://127.0.0.1:{PROM_PORT}/api/v1/{path}");
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let body = in_netns(&self.netns, move || {
            let mut req = ureq::get(&url).timeout(Duration::from_secs(5));
            for (k, v) in &query {
                req = req.query(k, v);
            }
            req.call()
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_json::<Value>().map_err(|e| e.to_string()))
        })?;
        Ok(body
            .ok()
            .filter(|b| b["status"] == "success")
            .map(|b| b["data"].clone()))
    }

    /// The instant-query result vector of `q`: (labels, value) per series; empty while the
    /// server does not answer.
    pub fn query(&self, q: &str) -> Result<Vec<(Value, f64)>> {
        let data = self.api("query", &[("query", q)])?.unwrap_or_default();
        Ok(data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let v = s["value"][1]
                    .as_str()
                    .unwrap_or("NaN")
                    .parse()
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), v)
            })
            .collect())
    }

    /// The single value of `q` once it equals `want`, or the last value seen after 30 s.
    pub fn wait_for(&self, q: &str, want: f64) -> Result<Option<f64>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(q)?.first().map(|s| s.1);
            if last == Some(want) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(last)
    }

    /// Every alert the server holds now (`/api/v1/alerts`: pending and firing), each with its
    /// `labels`, `annotations` and `state`; empty while the server does not answer.
    pub fn alerts(&self) -> Result<Vec<Value>> {
        Ok(self
            .api("alerts", &[])?
            .and_then(|d| d["alerts"].as_array().cloned())
            .unwrap_or_default())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}
