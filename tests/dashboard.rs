//! The web dashboard in a real browser: headless Chromium driven through chromedriver (WebDriver is plain HTTP and
//! JSON) against autodevd with two busy slots. The grid shows the slots, a preview line appears live, a stop from the
//! page stops the slot; without the token there is nothing but a 401. Without chromium and chromedriver the test
//! says SKIPPED (`.ci/run` installs them).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

use common::{Daemon, fake_config, wait_until};
use serde_json::{Value, json};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP exchange on 127.0.0.1: status, headers and body, read by its Content-Length (chromedriver keeps the
/// connection open whatever the request says).
fn http(port: u16, method: &str, path: &str, headers: &str, body: Option<&Value>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A browser session can take a while to start; nothing here may hang the test.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 65536];
    let (head, length) = loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "{method} {path}: the connection closed before the answer's headers");
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0usize);
            answer.drain(..end + 4);
            break (head, length);
        }
    };
    while answer.len() < length {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, String::from_utf8_lossy(&answer).into_owned())
}

/// chromedriver, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
    session: String,
}

impl Driver {
    fn start() -> Option<Driver> {
        let port = free_port();
        use std::os::unix::process::CommandExt;
        // Its own process group: the browsers it starts go with it.
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut driver = Driver { child, port, session: String::new() };
        wait_until("chromedriver to listen", || TcpStream::connect(("127.0.0.1", port)).ok());
        let caps = json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
        } } } });
        let (_, _, body) = http(port, "POST", "/session", "", Some(&caps));
        let answer: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        driver.session = answer["value"]["sessionId"].as_str()?.to_string();
        Some(driver)
    }

    fn call(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        let (_, _, answer) = http(self.port, method, &path, "", body.as_ref());
        serde_json::from_str::<Value>(&answer).unwrap_or(Value::Null)["value"].clone()
    }

    fn script(&self, code: &str) -> Value {
        self.call("POST", "execute/sync", Some(json!({ "script": code, "args": [] })))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), "", None);
        }
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn the_dashboard_shows_the_slots_live_and_stops_one_from_the_page() {
    let port = free_port();
    let mut c = fake_config(2);
    c["dashboard"] = json!({ "listen": format!("127.0.0.1:{port}") });
    let d = Daemon::start(&c);
    d.assign(1, &["--slot", "claude-1"], "First\n@say reading the parser\n@sleep 60");
    d.assign(2, &["--slot", "claude-2"], "Second\n@ticks 1000 0.3");
    d.wait_state("claude-2", "in_progress");
    let url = d.ctl(&["dashboard", "url"]).trim().to_string();
    let token = url.split_once("token=").unwrap().1.to_string();
    assert!(url.starts_with(&format!("http://127.0.0.1:{port}/?token=")), "{url}");

    // Nothing without the token; with it, a cookie scripts cannot read, and the token leaves the address bar.
    assert_eq!(http(port, "GET", "/api/status", "", None).0, 401);
    assert_eq!(http(port, "POST", "/api/slots/claude-1/stop", "Cookie: autodev_session=wrong\r\n", None).0, 401);
    // A session of its own in the cookie, never the token (browsers send a host's cookies to all its ports).
    let (status, head, _) = http(port, "GET", &format!("/?token={token}"), "", None);
    assert_eq!(status, 303);
    assert!(head.contains("HttpOnly") && head.contains("SameSite=Strict"), "{head}");
    assert!(head.to_ascii_lowercase().contains("referrer-policy: no-referrer"), "{head}");
    assert!(!head.contains(&token), "{head}");
    let session = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l.split_once(": ").unwrap().1))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_string();
    let cookie = format!("Cookie: {session}\r\n");
    let (status, _, body) = http(port, "GET", "/api/status", &cookie, None);
    assert_eq!(status, 200);
    // Another page on 127.0.0.1 (the same "site" to a browser) cannot make the daemon act.
    let forged = format!("{cookie}Origin: http://127.0.0.1:5173\r\nX-Autodev: 1\r\n");
    assert_eq!(http(port, "POST", "/api/slots/claude-1/stop", &forged, None).0, 403);
    assert_eq!(http(port, "POST", "/api/slots/claude-1/stop", &cookie, None).0, 403, "no page header");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["slots"].as_array().unwrap().len(), 6);

    let Some(browser) = Driver::start() else {
        eprintln!("SKIPPED: chromium and chromedriver are not installed");
        return;
    };
    browser.call("POST", "url", Some(json!({ "url": url })));
    let text = wait_until("the grid with both slots", || {
        let text = browser.script("return document.body.innerText");
        let text = text.as_str()?.to_string();
        (text.contains("claude-1") && text.contains("claude-2") && text.contains("reading the parser")).then_some(text)
    });
    assert!(text.contains("in progress"), "{text}");
    assert_eq!(browser.script("return location.search"), json!(""), "the token is out of the address bar");
    // A preview line that did not exist when the page loaded: pushed, not reloaded.
    let first = wait_until("a tick line", || {
        let text = browser.script("return document.querySelector('[data-slot=\"claude-2\"] pre').innerText");
        text.as_str()?.lines().last().filter(|l| l.starts_with("tick")).map(str::to_string)
    });
    wait_until("a newer tick line", || {
        let text = browser.script("return document.querySelector('[data-slot=\"claude-2\"] pre').innerText");
        text.as_str()?.lines().last().filter(|l| l.starts_with("tick") && *l != first).map(|_| ())
    });
    if let Ok(path) = std::env::var("AUTODEV_SCREENSHOT") {
        let png = browser.call("GET", "screenshot", None);
        let bytes = base64_decode(png.as_str().unwrap_or_default());
        std::fs::write(path, bytes).unwrap();
    }

    browser.script("window.confirm = () => true; document.querySelector('[data-stop=\"claude-2\"]').click(); return 1");
    d.wait_state("claude-2", "failed");
    assert_eq!(d.slot("claude-2")["end_cause"], "stopped");
    assert_eq!(d.slot("claude-1")["state"], "in_progress");
    wait_until("the page to show it", || {
        let state = browser.script("return document.querySelector('[data-slot=\"claude-2\"] .state').innerText");
        (state.as_str() == Some("failed")).then_some(())
    });

    // A rotation ends every session: the old cookie and the old URL are worth nothing.
    let rotated = d.ctl(&["dashboard", "url", "--rotate"]).trim().to_string();
    assert_ne!(rotated, url);
    assert_eq!(http(port, "GET", "/api/status", &cookie, None).0, 401);
    assert_eq!(http(port, "GET", &format!("/?token={token}"), "", None).0, 401);
}

/// Standard base64 (the screenshot), without a dependency for one test.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).collect();
    clean
        .chunks(4)
        .flat_map(|chunk| {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, c)| n | u32::from(value(*c)) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(chunk.len().saturating_sub(1))
        })
        .collect()
}
