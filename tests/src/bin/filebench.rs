//! `filebench`: files between two nodes on 127.0.0.1, tidesync against Syncthing in the same
//! run, with the same bytes, each link through the same counting proxy (which also cuts it
//! for case 3), and the machine's limit: the same bytes piped through a loopback TCP socket
//! and hashed with BLAKE3.
//!
//! 1. one file of `--big-mib` MiB (1024);
//! 2. `--files` files (10,000) of `--file-kib` KB (200), each referenced by its own object;
//! 3. case 2 with the link cut every `--cut-mib` MiB (64).
//!
//! Per case: the time from the receiver connecting to its last file stored, the peak memory
//! (VmHWM) of each process, the bytes that crossed the proxy, and the ratios. Syncthing (1.19
//! in Debian: `apt-get install syncthing`) runs with listening on 127.0.0.1 only and global
//! and local discovery, relays, NAT traversal, usage reporting, crash reporting and upgrades
//! off; it is skipped, with a note, when not installed.
//!
//! Run: `cargo run --release -p tidesync-tests --bin filebench -- [--cases 1,2,3]
//! [--no-syncthing]`.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidesync_tests::TestNode;
use tidesync_tests::bench::{peak_mib, request, wait_until, write_data};
use tidesync_tests::proxy::FlakyProxy;

/// Longest any case may take before the benchmark gives up on it.
const CASE_LIMIT: Duration = Duration::from_secs(1_800);

struct Args {
    big_mib: u64,
    files: usize,
    file_kib: u64,
    cut_mib: u64,
    cases: Vec<u32>,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let get = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let num = |name: &str, default: u64| get(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    Args {
        big_mib: num("--big-mib", 1024),
        files: num("--files", 10_000) as usize,
        file_kib: num("--file-kib", 200),
        cut_mib: num("--cut-mib", 64),
        cases: get("--cases")
            .unwrap_or_else(|| "1,2,3".into())
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect(),
    }
}

/// `len` pseudo-random bytes from `seed` (xorshift64), written to `path` in 1 MiB pieces.
/// What one tool did in one case.
struct Run {
    secs: f64,
    sender_mib: f64,
    receiver_mib: f64,
    wire_bytes: u64,
    cuts: u64,
}

/// The same bytes through a loopback TCP socket, hashed with BLAKE3 on the receiving side:
/// what the machine can do at best.
fn machine_limit(files: &[PathBuf]) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("address");
    let files = files.to_vec();
    let t = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut out = TcpStream::connect(addr).expect("connect");
        for f in &files {
            let mut src = std::fs::File::open(f).expect("open");
            std::io::copy(&mut src, &mut out).expect("send");
        }
    });
    let (mut conn, _) = listener.accept().expect("accept");
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = conn.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    sender.join().expect("sender");
    std::hint::black_box(hasher.finalize());
    t.elapsed().as_secs_f64()
}

fn run_tidesync(files: &[PathBuf], cut_bytes: u64) -> Run {
    let mut a = TestNode::init("send");
    let mut b = TestNode::init("recv");
    a.start();
    b.start();
    // Store the files and their objects on the sender first: only the transfer is timed.
    let mut objects = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let bytes = std::fs::read(f).expect("read data");
        let stored = request(
            &a,
            reqwest::Method::POST,
            "/v1/files",
            Some(bytes),
            "application/octet-stream",
        );
        objects.push(json!({"type": "Image", "id": format!("I-{i:06}"), "fields": {
            "file": {"$file": stored["hash"], "size": stored["size"], "name": format!("{i}.bin")}
        }}));
    }
    for batch in objects.chunks(5_000) {
        let body = serde_json::to_vec(batch).expect("json");
        request(
            &a,
            reqwest::Method::POST,
            "/v1/objects",
            Some(body),
            "application/json",
        );
    }
    let listen = a.listen_addr();
    let port: u16 = listen
        .split('/')
        .nth(4)
        .and_then(|p| p.parse().ok())
        .expect("listen port");
    let proxy = FlakyProxy::start(([127, 0, 0, 1], port).into(), cut_bytes);
    a.add_peer(&b, false);
    let t = Instant::now();
    let via = format!("/ip4/127.0.0.1/tcp/{}", proxy.addr().port());
    b.ok(&["peer", "add", "send", "--id", &a.id(), "--addr", &via]);
    let want = files.len();
    // The file feed's last number counts the files the receiver stored (it started empty).
    let feed = format!("/v1/changes?since={}&files_since=0&limit=1", u64::MAX);
    wait_until(
        CASE_LIMIT,
        "tidesync's receiver to store every file",
        || {
            let f = request(&b, reqwest::Method::GET, &feed, None, "application/json");
            f["files"]["last"].as_u64() == Some(want as u64)
        },
    );
    let secs = t.elapsed().as_secs_f64();
    let run = Run {
        secs,
        sender_mib: peak_mib(a.pid().expect("pid")),
        receiver_mib: peak_mib(b.pid().expect("pid")),
        wire_bytes: proxy.bytes(),
        cuts: proxy.cuts(),
    };
    a.stop();
    b.stop();
    run
}

/// A Syncthing instance: its home, ports, API key and process.
struct Syncthing {
    home: PathBuf,
    gui: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

const ST_KEY: &str = "tidesync-filebench-key";

impl Syncthing {
    fn generate(home: &Path) -> String {
        let out = Command::new("syncthing")
            .args(["generate", "--home"])
            .arg(home)
            .env("STNODEFAULTFOLDER", "1")
            .output()
            .expect("syncthing generate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("syncthing")
            .args(["--home"])
            .arg(home)
            .arg("--device-id")
            .output()
            .expect("syncthing --device-id");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Write the config: one folder shared with the other device, loopback only, every
    /// discovery, relay, NAT, reporting and upgrade switch off.
    #[allow(clippy::too_many_arguments)]
    fn configure(
        home: &Path,
        folder: &Path,
        me: &str,
        listen: u16,
        other: &str,
        other_addr: &str,
        gui: u16,
    ) {
        // Keep the config version the installed Syncthing generated.
        let generated = std::fs::read_to_string(home.join("config.xml")).unwrap_or_default();
        let version = generated
            .split("<configuration version=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("37")
            .to_string();
        std::fs::create_dir_all(folder.join(".stfolder")).expect("folder marker");
        let config = format!(
            r#"<configuration version="{version}">
  <folder id="bench" label="bench" path="{folder}" type="sendreceive" rescanIntervalS="36000" fsWatcherEnabled="false">
    <device id="{me}"></device>
    <device id="{other}"></device>
    <minDiskFree unit="%">1</minDiskFree>
  </folder>
  <device id="{me}" name="me"><address>dynamic</address></device>
  <device id="{other}" name="other"><address>{other_addr}</address></device>
  <gui enabled="true" tls="false"><address>127.0.0.1:{gui}</address><apikey>{ST_KEY}</apikey></gui>
  <options>
    <listenAddress>tcp://127.0.0.1:{listen}</listenAddress>
    <globalAnnounceEnabled>false</globalAnnounceEnabled>
    <localAnnounceEnabled>false</localAnnounceEnabled>
    <relaysEnabled>false</relaysEnabled>
    <natEnabled>false</natEnabled>
    <urAccepted>-1</urAccepted>
    <autoUpgradeIntervalH>0</autoUpgradeIntervalH>
    <crashReportingEnabled>false</crashReportingEnabled>
    <startBrowser>false</startBrowser>
  </options>
</configuration>
"#,
            folder = folder.display()
        );
        std::fs::write(home.join("config.xml"), config).expect("syncthing config");
    }

    fn start(home: &Path, gui: u16) -> Syncthing {
        let child = Command::new("syncthing")
            .args([
                "serve",
                "--no-browser",
                "--no-restart",
                "--no-upgrade",
                "--home",
            ])
            .arg(home)
            .env("STNODEFAULTFOLDER", "1")
            .env("STNOUPGRADE", "1")
            // One process: without this, `serve` runs a monitor process that starts the real
            // one as its child (whose memory is what counts, and which outlives a kill of
            // the monitor).
            .env("STMONITORED", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("syncthing serve");
        let st = Syncthing {
            home: home.to_path_buf(),
            gui,
            child: Some(child),
        };
        wait_until(CASE_LIMIT, "syncthing's API", || {
            st.rest("/rest/system/ping").is_some()
        });
        st
    }

    fn rest(&self, path: &str) -> Option<Value> {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .ok()?
            .get(format!("http://127.0.0.1:{}{path}", self.gui))
            .header("X-API-Key", ST_KEY)
            .send()
            .ok()?
            .json()
            .ok()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Syncthing {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = &self.home;
    }
}

fn run_syncthing(files: &[PathBuf], cut_bytes: u64) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ha, hb) = (dir.path().join("a"), dir.path().join("b"));
    let (fa, fb) = (dir.path().join("fa"), dir.path().join("fb"));
    for d in [&ha, &hb, &fa, &fb] {
        std::fs::create_dir_all(d).expect("dirs");
    }
    for f in files {
        std::fs::copy(f, fa.join(f.file_name().expect("name"))).expect("copy data");
    }
    let (ida, idb) = (Syncthing::generate(&ha), Syncthing::generate(&hb));
    let (pa, pb) = (free_port(), free_port());
    let (ga, gb) = (free_port(), free_port());
    let proxy = FlakyProxy::start(([127, 0, 0, 1], pa).into(), cut_bytes);
    // A only accepts; B dials A through the proxy.
    Syncthing::configure(&ha, &fa, &ida, pa, &idb, "dynamic", ga);
    Syncthing::configure(
        &hb,
        &fb,
        &idb,
        pb,
        &ida,
        &format!("tcp://127.0.0.1:{}", proxy.addr().port()),
        gb,
    );
    let a = Syncthing::start(&ha, ga);
    let n = files.len() as u64;
    wait_until(CASE_LIMIT, "syncthing's sender to scan its folder", || {
        a.rest("/rest/db/status?folder=bench")
            .is_some_and(|s| s["state"] == "idle" && s["localFiles"].as_u64() == Some(n))
    });
    let t = Instant::now();
    let b = Syncthing::start(&hb, gb);
    wait_until(
        CASE_LIMIT,
        "syncthing's receiver to hold every file",
        || {
            b.rest("/rest/db/status?folder=bench").is_some_and(|s| {
                s["needFiles"].as_u64() == Some(0)
                    && s["localFiles"].as_u64() == Some(n)
                    && s["state"] == "idle"
            })
        },
    );
    let secs = t.elapsed().as_secs_f64();
    Run {
        secs,
        sender_mib: peak_mib(a.pid()),
        receiver_mib: peak_mib(b.pid()),
        wire_bytes: proxy.bytes(),
        cuts: proxy.cuts(),
    }
}

fn report(label: &str, r: &Run, bytes: u64, limit: f64) {
    println!(
        "  {label:9} {:8.2} s  {:7.1} MB/s  peak RSS sender {:6.1} MiB, receiver {:6.1} MiB  wire {:8.1} MB ({:.3}x data)  cuts {}  {:.1}x the machine's limit",
        r.secs,
        bytes as f64 / 1e6 / r.secs,
        r.sender_mib,
        r.receiver_mib,
        r.wire_bytes as f64 / 1e6,
        r.wire_bytes as f64 / bytes.max(1) as f64,
        r.cuts,
        r.secs / limit
    );
}

fn main() {
    let a = args();
    // `--no-syncthing` times tidesync alone (to profile it, say).
    let has_syncthing = !std::env::args().any(|a| a == "--no-syncthing")
        && Command::new("syncthing").arg("--version").output().is_ok();
    let data = tempfile::tempdir().expect("data dir");
    println!(
        "filebench: tidesync {} against {}",
        env!("CARGO_PKG_VERSION"),
        if has_syncthing {
            String::from_utf8_lossy(
                &Command::new("syncthing")
                    .arg("--version")
                    .output()
                    .map(|o| o.stdout)
                    .unwrap_or_default(),
            )
            .trim()
            .to_string()
        } else {
            "no Syncthing (not installed: apt-get install syncthing; or --no-syncthing)".into()
        }
    );
    for case in &a.cases {
        let (files, cut, label): (Vec<PathBuf>, u64, String) = match case {
            1 => {
                let p = data.path().join("big.bin");
                if !p.exists() {
                    write_data(&p, a.big_mib << 20, 1);
                }
                (
                    vec![p],
                    u64::MAX,
                    format!("1: one file of {} MiB", a.big_mib),
                )
            }
            2 | 3 => {
                let dir = data.path().join("many");
                std::fs::create_dir_all(&dir).expect("dir");
                let files: Vec<PathBuf> = (0..a.files)
                    .map(|i| {
                        let p = dir.join(format!("{i:06}.bin"));
                        if !p.exists() {
                            write_data(&p, a.file_kib * 1000, 100 + i as u64);
                        }
                        p
                    })
                    .collect();
                let cut = if *case == 3 {
                    a.cut_mib << 20
                } else {
                    u64::MAX
                };
                let label = if *case == 3 {
                    format!(
                        "3: {} files of {} KB, link cut every {} MiB",
                        a.files, a.file_kib, a.cut_mib
                    )
                } else {
                    format!("2: {} files of {} KB", a.files, a.file_kib)
                };
                (files, cut, label)
            }
            _ => continue,
        };
        let bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        println!("case {label} ({:.1} MB)", bytes as f64 / 1e6);
        let limit = machine_limit(&files);
        println!(
            "  limit     {limit:8.2} s  {:7.1} MB/s  (loopback TCP + BLAKE3)",
            bytes as f64 / 1e6 / limit
        );
        let t = run_tidesync(&files, cut);
        report("tidesync", &t, bytes, limit);
        if has_syncthing {
            let s = run_syncthing(&files, cut);
            report("syncthing", &s, bytes, limit);
            println!(
                "  ratio     tidesync takes {:.2}x Syncthing's time",
                t.secs / s.secs
            );
        }
    }
}
