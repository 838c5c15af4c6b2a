//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! whose versions match; `.ci/run` installs them), for the status page's test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// Where Debian installs the driver and the browser.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A chromedriver process and one browser session in it; both end on drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
}

impl Browser {
    /// Start chromedriver on a free loopback port and open a headless session. Panics with
    /// what to install when the driver is missing.
    pub fn start() -> Browser {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "this test drives a real Chromium: install Debian's chromium and chromium-driver (.ci/run does)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("http client");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(format!("{base}/status")).send().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            http,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                // As root, Chromium needs --no-sandbox.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1800",
                         "--no-proxy-server", "--disable-background-networking"]
            }
        }}});
        let created = browser.call(reqwest::Method::POST, "/session", Some(caps));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().expect("chromedriver answers");
        let v: Value = resp.json().expect("chromedriver answers JSON");
        assert!(
            v["value"]["error"].is_null(),
            "WebDriver {path} failed: {}",
            v["value"]
        );
        v["value"].clone()
    }

    /// Load `url` in the page.
    pub fn goto(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call(reqwest::Method::POST, &path, Some(json!({ "url": url })));
    }

    /// Run `script` (a function body that may `return`) in the page; its result.
    pub fn eval(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call(
            reqwest::Method::POST,
            &path,
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Save a PNG screenshot of the page to `file`.
    pub fn screenshot(&self, file: &Path) {
        let path = format!("/session/{}/screenshot", self.session);
        let b64 = self.call(reqwest::Method::GET, &path, None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 text"))
            .expect("base64");
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).expect("artifact directory");
        }
        std::fs::write(file, png).expect("writing the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = self.http.delete(url).send();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Where tests leave artifacts: `target/test-artifacts`.
pub fn artifact_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("test-artifacts")
}
