//! Opens a page in headless Chromium over the DevTools protocol (`--remote-debugging-pipe`: JSON
//! messages ending in NUL on file descriptors 3 and 4, no ports, no websocket) and checks that it
//! loads with no console errors and with every image decoded.
//!
//! Chromium comes from Debian's `chromium` package (`.ci/run` installs it), or `$CHROMIUM`. Without
//! it the check is skipped with a reason, unless `VULNMAP_REQUIRE_BROWSER=1` makes that a failure.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

struct DevTools {
    to_browser: std::io::PipeWriter,
    events: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    /// Errors seen so far: console errors, uncaught exceptions, failed loads.
    errors: Vec<String>,
    loaded: bool,
}

impl DevTools {
    fn send(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = self
                .next(deadline)
                .unwrap_or_else(|| panic!("no answer to {method}"));
            if m["id"] == json!(id) {
                assert!(m.get("error").is_none(), "{method} failed: {m}");
                return m["result"].clone();
            }
        }
    }

    /// The next message, noting errors and the load event on the way.
    fn next(&mut self, deadline: Instant) -> Option<Value> {
        let m = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()?;
        let p = &m["params"];
        match m["method"].as_str() {
            Some("Runtime.exceptionThrown") => self
                .errors
                .push(format!("exception: {}", p["exceptionDetails"])),
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                self.errors.push(format!("console.error: {}", p["args"]))
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => self
                .errors
                .push(format!("{}: {}", p["entry"]["source"], p["entry"]["text"])),
            Some("Page.loadEventFired") => self.loaded = true,
            _ => {}
        }
        Some(m)
    }
}

/// Panics unless `page` loads in Chromium with no console errors and all images decoded.
pub(crate) fn check_report(page: &Path) {
    let Some(binary) = chromium() else {
        let reason = "no Chromium found (install Debian's `chromium`, or set CHROMIUM)";
        assert!(
            std::env::var("VULNMAP_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "{reason}; VULNMAP_REQUIRE_BROWSER=1 requires it"
        );
        eprintln!("skipping the browser check: {reason}");
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let (browser_in, to_browser) = std::io::pipe().unwrap();
    let (mut from_browser, browser_out) = std::io::pipe().unwrap();
    let (fd_in, fd_out) = (browser_in.as_raw_fd(), browser_out.as_raw_fd());
    let mut command = Command::new(&binary);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Move both ends out of the way first, in case either already is 3 or 4.
            let a = libc::fcntl(fd_in, libc::F_DUPFD, 10);
            let b = libc::fcntl(fd_out, libc::F_DUPFD, 10);
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    drop((browser_in, browser_out));
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        let mut pending = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = from_browser.read(&mut buf) {
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            while let Some(end) = pending.iter().position(|&b| b == 0) {
                let message: Vec<u8> = pending.drain(..=end).collect();
                if let Ok(v) = serde_json::from_slice::<Value>(&message[..end]) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut dt = DevTools {
        to_browser,
        events,
        next_id: 0,
        session: None,
        errors: Vec::new(),
        loaded: false,
    };
    let target = dt.send("Target.createTarget", json!({"url": "about:blank"}))["targetId"].clone();
    let session = dt.send(
        "Target.attachToTarget",
        json!({"targetId": target, "flatten": true}),
    )["sessionId"]
        .clone();
    dt.session = Some(session.as_str().unwrap().to_string());
    dt.send("Runtime.enable", json!({}));
    dt.send("Log.enable", json!({}));
    dt.send("Page.enable", json!({}));
    let url = format!("file://{}", std::path::absolute(page).unwrap().display());
    dt.send("Page.navigate", json!({"url": url}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dt.loaded {
        dt.next(deadline)
            .expect("the page's load event within a minute");
    }
    let images = dt.send(
        "Runtime.evaluate",
        json!({
            "expression": "JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]))",
            "returnByValue": true
        }),
    );
    let title = dt.send(
        "Runtime.evaluate",
        json!({"expression": "document.title", "returnByValue": true}),
    );
    // Late console messages have a moment to arrive.
    let settle = Instant::now() + Duration::from_millis(500);
    while dt.next(settle).is_some() {}
    dt.session = None;
    let _ = dt.send("Browser.close", json!({}));
    let _ = child.kill();
    let _ = child.wait();

    assert!(
        dt.errors.is_empty(),
        "console errors in {}: {:#?}",
        page.display(),
        dt.errors
    );
    assert!(
        title["result"]["value"]
            .as_str()
            .is_some_and(|t| t.starts_with("vulnmap")),
        "title: {title}"
    );
    let images: Vec<(bool, u64, String)> =
        serde_json::from_str(images["result"]["value"].as_str().expect("a JSON string")).unwrap();
    assert!(!images.is_empty(), "the report shows no images");
    for (complete, width, alt) in &images {
        assert!(*complete && *width > 0, "image `{alt}` did not load");
    }
    eprintln!(
        "{}: {} images loaded in Chromium, no console errors",
        page.display(),
        images.len()
    );
}

/// Whether a Chromium is there to check pages with.
pub(crate) fn available() -> bool {
    chromium().is_some()
}
