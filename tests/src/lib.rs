//! Support for integration tests that drive real `tidesync` node processes on 127.0.0.1.
//!
//! # Layout
//! - [`tidesync_bin`]: builds (once per test binary) and locates the real `tidesync` binary.
//! - [`TestNode`]: a node home in a temporary directory, its `run` process, its CLI and its API.
//! - [`mallory`]: a hostile peer: a real libp2p node with a configured peer's key that sends
//!   crafted frames.
//! - [`browser`]: a real headless Chromium over WebDriver (the status page's test).
//! - [`proxy`]: a TCP proxy that shapes each direction (rate, delay) and cuts every
//!   connection after so many bytes or seconds (thin, flaky links).
//! - [`bench`]: what the benchmark binaries share (data files, peak memory, raw requests).
//! - [`netns`]: a LAN of network namespaces the test creates, for mDNS.
//! - [`wan`]: two network namespaces joined by a link shaped packet by packet in user space
//!   (rate, delay, loss, outages), which TCP and QUIC cross alike.
//! - [`pouch`]: PouchDB beside tidesync in one run (`bench side-by-side`): its npm install,
//!   its driver (`pouchbench/pouch.js`) and the table of ratios.
//! - `src/bin/bench.rs`: the sync benchmark (`cargo run --release -p tidesync-tests --bin bench`).
//! - `src/bin/filebench.rs`: files against Syncthing (`cargo run --release -p tidesync-tests
//!   --bin filebench`).

pub mod bench;
pub mod browser;
pub mod mallory;
pub mod netns;
pub mod pouch;
pub mod proxy;
pub mod wan;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a node may take to start answering its API, in seconds.
pub const START_TIMEOUT_SECS: u64 = 60;

/// Run the tests against another `tidesync` binary: the path in this variable (for example an
/// older release's, to see a regression test fail there).
pub const TEST_BIN_ENV: &str = "TIDESYNC_TEST_BIN";

/// The `tidesync` binary, built from this workspace in the current profile, unless
/// [`TEST_BIN_ENV`] names another. It is built for the host without an explicit `--target`,
/// so it lands in the same target directory as the tests and reuses their compiled
/// dependencies (with `--target` cargo compiles the whole dependency tree a second time).
pub fn tidesync_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os(TEST_BIN_ENV) {
            return PathBuf::from(bin);
        }
        let build = escargot::CargoBuild::new()
            .package("tidesync")
            .bin("tidesync")
            .features("fault-injection")
            .current_release()
            .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
            .run();
        match build {
            Ok(build) => build.path().to_path_buf(),
            Err(e) => panic!(
                "building the tidesync binary: {e}\n{}",
                rebuild_for_the_error()
            ),
        }
    })
}

/// The compiler's own words when building the binary failed: escargot keeps only cargo's
/// summary line (the diagnostics travel in its JSON messages), so the same build runs again
/// in plain text and its last lines are returned for the panic message.
fn rebuild_for_the_error() -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "tidesync", "--bin", "tidesync"]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd
        .args(["--features", "fault-injection", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .output();
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            format!("cargo build again ({}):\n{tail}", out.status)
        }
        Err(e) => format!("cargo could not be run again: {e}"),
    }
}

/// A node's home in a temporary directory, and its running process if started.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub name: String,
    child: Option<Child>,
    api: Option<String>,
    token: Option<String>,
    /// The network namespace the node and its CLI run in (see [`netns`]); its API is then
    /// reachable only through the CLI.
    netns: Option<String>,
}

impl TestNode {
    /// `tidesync init` a new home with ephemeral ports.
    pub fn init(name: &str) -> TestNode {
        Self::init_with(name, &[])
    }

    /// `tidesync init` with extra flags.
    pub fn init_with(name: &str, extra: &[&str]) -> TestNode {
        Self::init_in(name, None, extra)
    }

    /// `tidesync init` a node that runs in network namespace `netns` (listening for peers on
    /// all of its addresses), with extra flags.
    pub fn init_in(name: &str, netns: Option<String>, extra: &[&str]) -> TestNode {
        let dir = tempfile::tempdir().expect("temporary directory");
        let listen = if netns.is_some() {
            "/ip4/0.0.0.0/tcp/0"
        } else {
            "/ip4/127.0.0.1/tcp/0"
        };
        let mut node = TestNode {
            dir,
            name: name.to_string(),
            child: None,
            api: None,
            token: None,
            netns,
        };
        let home = node.home();
        let mut args = vec![
            "init",
            "--home",
            home.to_str().expect("utf-8 temp path"),
            "--name",
            name,
            "--api",
            "127.0.0.1:0",
        ];
        // A test's own `--listen` replaces the default one.
        if !extra.contains(&"--listen") {
            args.extend(["--listen", listen]);
        }
        args.extend_from_slice(extra);
        let out = node.command().args(&args).output().expect("running init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        node.token = node.token_file();
        node
    }

    /// The API token in the home's token file (`init` writes it, `run` creates it for older
    /// homes), if there is one.
    pub fn token_file(&self) -> Option<String> {
        std::fs::read_to_string(self.home().join("api.token"))
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// A command running the `tidesync` binary, inside the node's namespace if it has one.
    fn command(&self) -> Command {
        match &self.netns {
            None => Command::new(tidesync_bin()),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(tidesync_bin());
                cmd
            }
        }
    }

    /// The token this node's requests carry.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// Start `tidesync run` and wait until its API answers.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Start `tidesync run` with extra environment variables (such as `TIDESYNC_FAULT`).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "{} already started", self.name);
        let _ = std::fs::remove_file(self.home().join("node.api"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("node.log"))
            .expect("log file");
        let child = self
            .command()
            .args(["run", "--home"])
            .arg(self.home())
            .env(
                "RUST_LOG",
                std::env::var("TIDESYNC_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning tidesync run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(START_TIMEOUT_SECS);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited during start with {status}: {}",
                    self.name,
                    self.log()
                );
            }
            if let Ok(addr) = std::fs::read_to_string(self.home().join("node.api")) {
                let addr = addr.trim().to_string();
                self.api = Some(addr);
                self.token = self.token_file();
                let answers = match self.netns {
                    None => self.http(reqwest::Method::GET, "/v1/status", None).0 == 200,
                    Some(_) => self.cli(&["status"]).status.success(),
                };
                if answers {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start: {}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Run the node's later commands, and its next `run`, in network namespace `netns` (the
    /// node must be stopped; its home stays where it is).
    pub fn set_netns(&mut self, netns: Option<String>) {
        assert!(self.child.is_none(), "{} is running", self.name);
        self.netns = netns;
    }

    /// This node's id.
    pub fn id(&self) -> String {
        self.ok(&["id"]).trim().to_string()
    }

    /// The running node's status.
    pub fn status(&self) -> Value {
        json(&self.ok(&["status", "--json"]))
    }

    /// The first address the running node listens on for peers.
    pub fn listen_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(START_TIMEOUT_SECS);
        loop {
            if let Some(a) = self.status()["listen"]
                .as_array()
                .and_then(|l| l.first())
                .and_then(|a| a.as_str())
            {
                return a.to_string();
            }
            assert!(Instant::now() < deadline, "{} never listened", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every address the node listens on for peers, once it listens.
    pub fn listen_addrs(&self) -> Vec<String> {
        self.listen_addr();
        self.status()["listen"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Configure `other` as a peer, reachable at its listen address when `dial` is true.
    pub fn add_peer(&self, other: &TestNode, dial: bool) {
        self.add_peer_with(other, dial, &[]);
    }

    /// Configure `other` as a peer with policy options (`--skip`, `--prefix`, ...).
    pub fn add_peer_with(&self, other: &TestNode, dial: bool, policy: &[&str]) {
        let id = other.id();
        let mut args = vec!["peer", "add", other.name.as_str(), "--id", id.as_str()];
        let addr;
        if dial {
            addr = other.listen_addr();
            args.extend(["--addr", addr.as_str()]);
        }
        args.extend_from_slice(policy);
        self.ok(&args);
    }

    /// The status entry of the peer called `name`.
    pub fn peer(&self, name: &str) -> Value {
        self.status()["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or_else(|| panic!("{} has no peer {name}", self.name))
    }

    /// The object as JSON, or None if it does not exist here.
    pub fn get(&self, ty: &str, id: &str) -> Option<Value> {
        let out = self.cli(&["get", ty, id]);
        out.status
            .success()
            .then(|| json(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Send a signal (`TERM`, `KILL`) and wait for the process to exit.
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node not running");
        let ok = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(ok.success());
        let status = child.wait().expect("waiting for node");
        self.api = None;
        status
    }

    /// Stop with SIGTERM; asserts a clean exit.
    pub fn stop(&mut self) {
        let status = self.signal("TERM");
        assert!(
            status.success(),
            "{} exited with {status}: {}",
            self.name,
            self.log()
        );
    }

    /// Run a CLI command against this home.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    /// Run a CLI command with `stdin` piped in.
    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.command();
        cmd.env("TIDESYNC_HOME", self.home()).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning the CLI");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("writing stdin");
        }
        child.wait_with_output().expect("waiting for the CLI")
    }

    /// Run a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tidesync {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// The API base URL of the running node.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api.as_deref().expect("node not running"))
    }

    /// One HTTP request to the running node; returns the status and the body as JSON (or a
    /// string value when the body is not JSON).
    pub fn http(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> (u16, Value) {
        self.http_with(method, path, body, self.token.as_deref())
    }

    /// One HTTP request with an explicit bearer token (or none).
    pub fn http_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let client = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(90))
            .build()
            .expect("http client");
        let mut req = client.request(method.clone(), format!("{}{path}", self.api_url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        // State-changing requests name their media type even without a body, as the node
        // requires.
        if body.is_some() || !matches!(method, reqwest::Method::GET | reqwest::Method::HEAD) {
            req = req.header("content-type", "application/json");
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        match req.send() {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().unwrap_or_default();
                let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
                (status, json)
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `chars` characters of base64 over pseudo-random bytes drawn from `seed`: padding for test
/// records that zstd cannot shrink (repeated characters would compress to almost nothing on
/// the wire, and a test that needs bytes on the link would get none).
pub fn noise(seed: u64, chars: usize) -> String {
    use base64::Engine;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let bytes: Vec<u8> = (0..chars.div_ceil(4) * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut text = base64::engine::general_purpose::STANDARD.encode(bytes);
    text.truncate(chars);
    text
}

/// Wait until `cond` holds, polling; panics with `what` after [`CONVERGE_TIMEOUT_SECS`].
/// Convergence is asserted on state, never on how long it took.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(CONVERGE_TIMEOUT_SECS);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Longest any test waits for nodes to converge, in seconds (a bound for hung tests, not a
/// speed goal).
pub const CONVERGE_TIMEOUT_SECS: u64 = 90;

/// Parse one line of JSON output.
pub fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// `len` bytes no two positions of which repeat in a short period, from `seed` (file
/// contents for tests).
pub fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ seed.wrapping_mul(0x85eb_ca6b);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
