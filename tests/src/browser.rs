//! A headless Chromium driven over the Chrome DevTools Protocol, for the tests of the pages
//! flowtrace serves (the map).
//!
//! [`Browser::launch`] starts Debian's `chromium` with its own profile in a temporary
//! directory, reads the DevTools port the browser chose from `DevToolsActivePort`, finds its
//! first page at `http://127.0.0.1:PORT/json/list` and speaks CDP to it over a WebSocket:
//! loopback only. Clicks go through `Input.dispatchMouseEvent`, the browser's own input
//! pipeline (hit testing included), not through a script's `element.click()`.
//!
//! The browser runs in a process group of its own; dropping the [`Browser`] (also on a
//! panic) kills that group and removes the profile.

use std::{
    collections::VecDeque,
    io::Read,
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::{Error, Result};

/// The program launched: Debian's package of Chromium.
pub const CHROMIUM: &str = "chromium";
/// How long one protocol command may take before it is an error.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The window (and so the viewport) size.
pub const WINDOW: (u32, u32) = (1600, 1000);

static PROFILES: AtomicU32 = AtomicU32::new(0);

/// A running headless Chromium and a DevTools session on its page.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    socket: WebSocket<TcpStream>,
    next_id: u64,
    /// Events read while waiting for a command's answer.
    events: VecDeque<Value>,
    /// Uncaught exceptions and `console.error` calls of the page, as text.
    errors: Vec<String>,
}

fn check(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Where `program` is on PATH, if anywhere.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

impl Browser {
    /// Starts `chromium --headless=new` on `about:blank` and connects to its page.
    pub fn launch() -> Result<Browser> {
        if on_path(CHROMIUM).is_none() {
            return Err(Error::Invalid(format!(
                "`{CHROMIUM}` is not on PATH: the page tests drive Debian's headless Chromium; \
                 run scripts/setup.sh (it installs the chromium and fonts-dejavu-core packages)"
            )));
        }
        let profile = std::env::temp_dir().join(format!(
            "flowtrace-chromium-{}-{}",
            std::process::id(),
            PROFILES.fetch_add(1, Ordering::Relaxed)
        ));
        if profile.exists() {
            std::fs::remove_dir_all(&profile).map_err(check(format!(
                "removing the stale browser profile {}",
                profile.display()
            )))?;
        }
        std::fs::create_dir_all(&profile).map_err(check(format!(
            "creating the browser profile {}",
            profile.display()
        )))?;
        let log = profile.join("chromium.log");
        let stderr =
            std::fs::File::create(&log).map_err(check(format!("creating {}", log.display())))?;
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--remote-debugging-port=0".into(),
            "--remote-debugging-address=127.0.0.1".into(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            // Offline and quiet: no update checks, sync, first-run pages or extensions.
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            "--mute-audio".into(),
            "about:blank".into(),
        ];
        let cmd = format!("{CHROMIUM} {}", args.join(" "));
        let child = Command::new(CHROMIUM)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        // From here on the guard's drop kills the browser and removes the profile.
        let mut guard = Launching {
            child: Some(child),
            profile: profile.clone(),
        };
        let port = guard.devtools_port(&log)?;
        let ws_url = page_socket(port)?;
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(check(format!(
            "connecting to Chromium's DevTools port 127.0.0.1:{port}"
        )))?;
        // A patient handshake; then short reads, so that waits can poll their deadline.
        stream
            .set_read_timeout(Some(COMMAND_TIMEOUT))
            .map_err(check("setting the DevTools socket's read timeout"))?;
        let (socket, _) = tungstenite::client::client(ws_url.as_str(), stream).map_err(|e| {
            Error::Invalid(format!(
                "the WebSocket handshake with Chromium's page at {ws_url} failed: {e}"
            ))
        })?;
        socket
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(check("setting the DevTools socket's read timeout"))?;
        let Some(child) = guard.child.take() else {
            return Err(Error::Invalid("the browser process went missing".into()));
        };
        let mut browser = Browser {
            child,
            profile,
            socket,
            next_id: 0,
            events: VecDeque::new(),
            errors: Vec::new(),
        };
        for domain in ["Page.enable", "Runtime.enable"] {
            browser.call(domain, json!({}))?;
        }
        Ok(browser)
    }

    /// Sends one protocol command and returns its result (events read meanwhile are kept).
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let text = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket
            .send(Message::text(text))
            .map_err(|e| Error::Invalid(format!("sending {method} to Chromium: {e}")))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let Some(msg) = self.read_message(deadline, method)? else {
                continue;
            };
            if msg.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(err) = msg.get("error") {
                    return Err(Error::Invalid(format!(
                        "Chromium refused {method}: {err} (params: {params})"
                    )));
                }
                return Ok(msg.get("result").cloned().unwrap_or(Value::Null));
            }
            self.keep_event(msg);
        }
    }

    /// One message, or None when none came within the socket's read timeout.
    fn read_message(&mut self, deadline: Instant, waiting_for: &str) -> Result<Option<Value>> {
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "Chromium did not answer {waiting_for} within {} s",
                COMMAND_TIMEOUT.as_secs()
            )));
        }
        match self.socket.read() {
            Ok(Message::Text(t)) => serde_json::from_str(t.as_str()).map(Some).map_err(|e| {
                Error::Invalid(format!(
                    "Chromium sent a DevTools message that is not JSON ({e}): {}",
                    t.as_str()
                ))
            }),
            Ok(_) => Ok(None),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::Invalid(format!(
                "reading from Chromium's DevTools socket while waiting for {waiting_for}: {e}{}",
                self.log_tail()
            ))),
        }
    }

    fn keep_event(&mut self, msg: Value) {
        match msg.get("method").and_then(Value::as_str) {
            Some("Runtime.exceptionThrown") => {
                let d = &msg["params"]["exceptionDetails"];
                let text = d["exception"]["description"]
                    .as_str()
                    .or_else(|| d["text"].as_str())
                    .unwrap_or("an exception");
                self.errors.push(format!(
                    "uncaught {text} (line {}, column {})",
                    d["lineNumber"], d["columnNumber"]
                ));
            }
            Some("Runtime.consoleAPICalled") if msg["params"]["type"] == "error" => {
                let args: Vec<String> = msg["params"]["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        a["value"]
                            .as_str()
                            .map(String::from)
                            .or_else(|| a["description"].as_str().map(String::from))
                            .unwrap_or_else(|| a["value"].to_string())
                    })
                    .collect();
                self.errors
                    .push(format!("console.error: {}", args.join(" ")));
            }
            _ => {}
        }
        if self.events.len() > 1000 {
            self.events.pop_front();
        }
        self.events.push_back(msg);
    }

    /// The page's uncaught exceptions and `console.error` calls seen so far.
    pub fn page_errors(&mut self) -> Result<Vec<String>> {
        // Drain what has arrived.
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while let Some(msg) = self.read_message(deadline, "pending events")? {
            self.keep_event(msg);
        }
        Ok(self.errors.clone())
    }

    /// Loads `url` and waits for its load event.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        self.events.clear();
        let r = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(err) = r.get("errorText").and_then(Value::as_str) {
            return Err(Error::Invalid(format!(
                "Chromium could not load {url}: {err}"
            )));
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let what = format!("the load event of {url}");
        loop {
            if self
                .events
                .iter()
                .any(|e| e["method"] == "Page.loadEventFired")
            {
                return Ok(());
            }
            if let Some(msg) = self.read_message(deadline, &what)? {
                self.keep_event(msg);
            }
        }
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its value as JSON
    /// (`undefined` as null); a thrown exception is the error.
    pub fn eval(&mut self, js: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex["exception"]["description"]
                .as_str()
                .or_else(|| ex["text"].as_str())
                .unwrap_or("an exception");
            return Err(Error::Invalid(format!(
                "evaluating in the page threw {text}\n  script: {js}"
            )));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Waits until `condition` (a JavaScript expression) is true in the page; returns the
    /// time it took.
    pub fn wait_for(&mut self, condition: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let v = self.eval(condition)?;
            if v == Value::Bool(true) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                let errors = self.page_errors()?;
                return Err(Error::Check(format!(
                    "the page did not get to `{condition}` within {} s (last value {v}); page errors: {errors:?}",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A left click at (x, y), CSS pixels of the viewport, through the browser's input
    /// pipeline: the mouse moves there, is pressed and released.
    pub fn click_at(&mut self, x: f64, y: f64) -> Result<()> {
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": "mouseMoved", "x": x, "y": y}),
        )?;
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "buttons": 1, "clickCount": 1}),
            )?;
        }
        Ok(())
    }

    /// A point where a click lands on the map page's edge `edge_id` (its hit path, in
    /// viewport pixels, after scrolling to the top), or `None` if other elements cover all
    /// of it. A person would click there.
    pub fn edge_click_point(&mut self, edge_id: &str) -> Result<Option<(f64, f64)>> {
        let id = serde_json::to_string(edge_id)
            .map_err(|e| Error::Invalid(format!("edge id {edge_id:?}: {e}")))?;
        let p = self.eval(&format!(
            "(() => {{
              window.scrollTo(0, 0);
              const g = [...document.querySelectorAll('#map g.edge')].find(x => x.dataset.id === {id});
              if (!g) return null;
              const p = g.querySelector('path.hit'), len = p.getTotalLength(), m = p.getScreenCTM();
              for (const f of [0.5, 0.45, 0.55, 0.4, 0.6, 0.35, 0.65, 0.3, 0.7, 0.25, 0.75, 0.2, 0.8, 0.15, 0.85]) {{
                const q = p.getPointAtLength(len * f);
                const x = q.x * m.a + q.y * m.c + m.e, y = q.x * m.b + q.y * m.d + m.f;
                if (x < 0 || y < 0 || x > innerWidth || y > innerHeight) continue;
                const hit = document.elementFromPoint(x, y);
                if (hit && hit.closest('g.edge') === g) return {{ x, y }};
              }}
              return null;
            }})()"
        ))?;
        Ok(p["x"].as_f64().zip(p["y"].as_f64()))
    }

    /// Writes a PNG of the whole page (beyond the viewport) to `path`; returns its size.
    pub fn screenshot(&mut self, path: &Path) -> Result<usize> {
        let metrics = self.call("Page.getLayoutMetrics", json!({}))?;
        let size = &metrics["cssContentSize"];
        let (w, h) = (
            size["width"].as_f64().unwrap_or(f64::from(WINDOW.0)),
            size["height"].as_f64().unwrap_or(f64::from(WINDOW.1)),
        );
        let r = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": w.ceil(), "height": h.ceil(), "scale": 1},
            }),
        )?;
        let data = r["data"].as_str().ok_or_else(|| {
            Error::Invalid(format!("Page.captureScreenshot answered without data: {r}"))
        })?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| Error::Invalid(format!("the screenshot is not base64: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(check(format!("creating {}", dir.display())))?;
        }
        std::fs::write(path, &png).map_err(check(format!("writing {}", path.display())))?;
        Ok(png.len())
    }

    fn log_tail(&self) -> String {
        tail(&self.profile.join("chromium.log"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.socket.close(None);
        stop(&mut self.child, &self.profile);
    }
}

/// The browser between its start and the first session: killed on an early error.
struct Launching {
    child: Option<Child>,
    profile: PathBuf,
}

impl Launching {
    /// The port Chromium wrote to `DevToolsActivePort` in its profile.
    fn devtools_port(&mut self, log: &Path) -> Result<u16> {
        let file = self.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                    return Ok(port);
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Error::Invalid(format!(
                        "{CHROMIUM} exited ({status}) before it opened its DevTools port{}",
                        tail(log)
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "{CHROMIUM} did not write {} within 30 s{}",
                    file.display(),
                    tail(log)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Launching {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, &self.profile);
        }
    }
}

/// The WebSocket URL of the browser's first page.
fn page_socket(port: u16) -> Result<String> {
    let url = format!("http://127.0.0.1:{port}/json/list");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let targets: Value = ureq::get(&url)
            .timeout(Duration::from_secs(5))
            .call()
            .map_err(|e| Error::Invalid(format!("GET {url}: {e}")))?
            .into_json()
            .map_err(check(format!("reading the answer of GET {url}")))?;
        let page = targets.as_array().into_iter().flatten().find_map(|t| {
            (t["type"] == "page")
                .then(|| t["webSocketDebuggerUrl"].as_str())
                .flatten()
        });
        if let Some(ws) = page {
            return Ok(ws.to_string());
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "GET {url} lists no page with a webSocketDebuggerUrl: {targets}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the browser's process group (the browser and the helpers it forked), reaps the
/// browser and removes its profile.
fn stop(child: &mut Child, profile: &Path) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the process group this module created (process_group(0) made
        // the browser its leader); no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.wait();
    // Helpers may hold the profile a moment after the leader's death.
    for _ in 0..20 {
        if std::fs::remove_dir_all(profile).is_ok() || !profile.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of the browser's log, for an error message.
fn tail(log: &Path) -> String {
    let mut text = String::new();
    if std::fs::File::open(log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
    {
        return String::new();
    }
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    format!(
        "\n  last lines of {}:\n    {}",
        log.display(),
        lines[from..].join("\n    ")
    )
}
