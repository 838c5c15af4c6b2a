//! `tidesync demo`: a hub and two labs as separate node processes on 127.0.0.1, writing,
//! editing the same object concurrently, and converging, all in temporary homes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The whole demo stops by itself within this many seconds.
pub const DEMO_DEADLINE_SECS: u64 = 55;
/// How often the demo looks at the nodes, in milliseconds.
const POLL_MS: u64 = 100;

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot create a temporary directory: {0}")]
    TempDir(std::io::Error),
    #[error("cannot find this program to start nodes with: {0}")]
    Exe(std::io::Error),
    #[error("`tidesync {args}` failed: {detail}")]
    Command { args: String, detail: String },
    #[error("node {node}: {detail}")]
    Node { node: String, detail: String },
    #[error("the nodes did not converge within {DEMO_DEADLINE_SECS} s: {0}")]
    Timeout(String),
}

struct DemoNode {
    name: &'static str,
    home: PathBuf,
    child: Option<Child>,
    api: String,
    /// The API token, read from the home's token file once the node runs.
    token: String,
    id: String,
    p2p: String,
}

struct Demo {
    http: reqwest::blocking::Client,
    nodes: Vec<DemoNode>,
    started: Instant,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let _ = child.wait();
            }
        }
    }
}

impl Demo {
    fn request(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DemoError> {
        let n = &self.nodes[i];
        let err = |detail: String| DemoError::Node {
            node: n.name.into(),
            detail,
        };
        let changes_state = !matches!(method, reqwest::Method::GET | reqwest::Method::HEAD);
        let mut req = self
            .http
            .request(method, format!("http://{}{path}", n.api))
            .bearer_auth(&n.token);
        if let Some(b) = body {
            req = req.json(&b);
        } else if changes_state {
            req = req.header(
                reqwest::header::CONTENT_TYPE,
                crate::api::guard::JSON_MEDIA_TYPE,
            );
        }
        let resp = req.send().map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| err(e.to_string()))?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Value::Null);
        }
        if !status.is_success() {
            return Err(err(format!("HTTP {status}: {text}")));
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        })
    }

    fn put(&self, i: usize, key: &str, fields: Value) -> Result<(), DemoError> {
        self.request(
            i,
            reqwest::Method::PUT,
            &format!("/v1/objects/{key}"),
            Some(fields),
        )
        .map(|_| ())
    }

    fn get(&self, i: usize, key: &str) -> Result<Value, DemoError> {
        self.request(i, reqwest::Method::GET, &format!("/v1/objects/{key}"), None)
    }

    fn link(&self, a: usize, b: usize) -> Result<(), DemoError> {
        let peer = &self.nodes[b];
        let body = json!({"id": peer.id, "addrs": [peer.p2p]});
        self.request(
            a,
            reqwest::Method::PUT,
            &format!("/v1/peers/{}", peer.name),
            Some(body),
        )
        .map(|_| ())
    }

    fn unlink(&self, a: usize, b: usize) -> Result<(), DemoError> {
        let name = self.nodes[b].name;
        self.request(
            a,
            reqwest::Method::DELETE,
            &format!("/v1/peers/{name}"),
            None,
        )
        .map(|_| ())
    }

    fn elapsed(&self) -> String {
        format!("{:5.1} s", self.started.elapsed().as_secs_f64())
    }

    /// Print what each node holds of `keys` whenever it changes, until all agree.
    fn converge(&self, keys: &[&str]) -> Result<(), DemoError> {
        let mut last_shown = String::new();
        loop {
            let mut rows = Vec::new();
            let mut views = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                let view: Vec<Value> = keys
                    .iter()
                    .map(|k| self.get(i, k))
                    .collect::<Result<_, _>>()?;
                let cells: Vec<String> = view
                    .iter()
                    .map(|v| {
                        if v.is_null() {
                            "-".to_string()
                        } else {
                            v.to_string()
                        }
                    })
                    .collect();
                rows.push(format!("    {:<6} {}", n.name, cells.join("  ")));
                views.push(view);
            }
            let shown = rows.join("\n");
            if shown != last_shown {
                println!("  [{}] {}", self.elapsed(), keys.join("  "));
                println!("{shown}");
                last_shown = shown.clone();
            }
            if views.windows(2).all(|w| w[0] == w[1]) && views[0].iter().all(|v| !v.is_null()) {
                println!(
                    "  [{}] all three nodes hold the same {} object(s)",
                    self.elapsed(),
                    keys.len()
                );
                return Ok(());
            }
            if self.started.elapsed() > Duration::from_secs(DEMO_DEADLINE_SECS) {
                return Err(DemoError::Timeout(shown));
            }
            std::thread::sleep(Duration::from_millis(POLL_MS));
        }
    }
}

fn start_node(exe: &Path, dir: &Path, name: &'static str) -> Result<DemoNode, DemoError> {
    let home = dir.join(name);
    let home_s = home.to_string_lossy().into_owned();
    let init = Command::new(exe)
        .args([
            "init",
            "--home",
            &home_s,
            "--name",
            name,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ])
        .output()
        .map_err(|e| DemoError::Command {
            args: "init".into(),
            detail: e.to_string(),
        })?;
    if !init.status.success() {
        return Err(DemoError::Command {
            args: "init".into(),
            detail: String::from_utf8_lossy(&init.stderr).into(),
        });
    }
    let log =
        std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| DemoError::Node {
            node: name.into(),
            detail: e.to_string(),
        })?;
    let child = Command::new(exe)
        .args(["run", "--home", &home_s])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| DemoError::Node {
            node: name.into(),
            detail: e.to_string(),
        })?;
    Ok(DemoNode {
        name,
        home,
        child: Some(child),
        api: String::new(),
        token: String::new(),
        id: String::new(),
        p2p: String::new(),
    })
}

/// Run the demo; every node process and temporary home is gone when it returns.
pub fn run() -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(DemoError::Exe)?;
    let dir = tempfile::Builder::new()
        .prefix("tidesync-demo-")
        .tempdir()
        .map_err(DemoError::TempDir)?;
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| DemoError::Node {
            node: "-".into(),
            detail: e.to_string(),
        })?;
    println!("tidesync demo: a hub and two labs as separate node processes on 127.0.0.1");
    println!("  homes and logs in {}", dir.path().display());
    let mut demo = Demo {
        http,
        nodes: Vec::new(),
        started: Instant::now(),
    };
    for name in ["hub", "lab-a", "lab-b"] {
        let node = start_node(&exe, dir.path(), name)?;
        demo.nodes.push(node);
    }
    // Wait for each node's API and listen address.
    for i in 0..demo.nodes.len() {
        loop {
            let api_file = demo.nodes[i].home.join("node.api");
            let token = crate::config::Home::new(&demo.nodes[i].home).token();
            if let (Ok(addr), Ok(Some(token))) = (
                std::fs::read_to_string(&api_file),
                crate::api::token::load(&token),
            ) {
                demo.nodes[i].api = addr.trim().to_string();
                demo.nodes[i].token = token;
                if let Ok(status) = demo.request(i, reqwest::Method::GET, "/v1/status", None)
                    && let Some(listen) = status["listen"]
                        .as_array()
                        .and_then(|l| l.first())
                        .and_then(|a| a.as_str())
                {
                    demo.nodes[i].id = status["node"].as_str().unwrap_or_default().to_string();
                    demo.nodes[i].p2p = listen.to_string();
                    break;
                }
            }
            if demo.started.elapsed() > Duration::from_secs(DEMO_DEADLINE_SECS) {
                return Err(DemoError::Timeout(format!(
                    "{} did not start",
                    demo.nodes[i].name
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let n = &demo.nodes[i];
        println!("  {:<6} {}  api {}  p2p {}", n.name, n.id, n.api, n.p2p);
    }

    println!(
        "\n1. The labs peer with the hub (and only with it); each node writes its own objects."
    );
    for lab in [1, 2] {
        demo.link(lab, 0)?;
        demo.link(0, lab)?;
    }
    demo.put(
        0,
        "Method/HPLC-1",
        json!({"name": "HPLC assay", "version": 3}),
    )?;
    demo.put(
        1,
        "Sample/S-A1",
        json!({"status": "received", "volume_ml": 2.5, "lab": "a"}),
    )?;
    demo.put(
        2,
        "Sample/S-B1",
        json!({"status": "received", "volume_ml": 1.0, "lab": "b"}),
    )?;
    demo.converge(&["Method/HPLC-1", "Sample/S-A1", "Sample/S-B1"])?;

    println!("\n2. Both labs lose the hub and edit Sample/S-A1 at the same time:");
    println!("   lab-a sets status=analysed and ph=7.1; lab-b sets status=rerun and analyst=kim.");
    for lab in [1, 2] {
        demo.unlink(lab, 0)?;
        demo.unlink(0, lab)?;
    }
    demo.put(1, "Sample/S-A1", json!({"status": "analysed", "ph": 7.1}))?;
    demo.put(
        2,
        "Sample/S-A1",
        json!({"status": "rerun", "analyst": "kim"}),
    )?;
    println!("   lab-a now holds {}", demo.get(1, "Sample/S-A1")?);
    println!("   lab-b now holds {}", demo.get(2, "Sample/S-A1")?);

    println!(
        "\n3. The links come back; the edits merge field by field, and the same winner is chosen everywhere."
    );
    for lab in [1, 2] {
        demo.link(lab, 0)?;
        demo.link(0, lab)?;
    }
    demo.converge(&["Sample/S-A1"])?;
    let history = demo.request(
        2,
        reqwest::Method::GET,
        "/v1/objects/Sample/S-A1/history",
        None,
    )?;
    println!(
        "\n   Sample/S-A1's history as lab-b verifies it (every author checked, even through the hub):"
    );
    for c in history["changes"].as_array().into_iter().flatten() {
        let author = c["author"].as_str().unwrap_or_default();
        let who = demo
            .nodes
            .iter()
            .find(|n| n.id == author)
            .map(|n| n.name)
            .unwrap_or("?");
        println!(
            "    {}  by {:<6} {}",
            &c["hash"].as_str().unwrap_or_default()[..12],
            who,
            if c["verified"] == json!(true) {
                "signature verified"
            } else {
                "SIGNATURE INVALID"
            }
        );
    }
    println!("\nstopping all nodes ({} since start)", demo.elapsed());
    drop(demo);
    Ok(())
}
