//! The local HTTP API against web pages and misbehaving local clients (issue 12, section 4):
//! real node processes on 127.0.0.1, requests written byte by byte on raw TCP connections
//! where a browser's headers (Host, Origin, form media types) must be reproduced exactly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use tidesync_tests::{CONVERGE_TIMEOUT_SECS, TestNode, json, wait_for};

/// The API's address, `127.0.0.1:PORT`.
fn addr(node: &TestNode) -> String {
    node.api_url().trim_start_matches("http://").to_string()
}

/// One HTTP/1.1 request on a fresh connection, closed after the answer: the status and body.
fn raw(
    node: &TestNode,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut text = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        text.push_str(&format!("Host: {}\r\n", addr(node)));
    }
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut stream = TcpStream::connect(addr(node)).expect("connecting to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(CONVERGE_TIMEOUT_SECS)))
        .unwrap();
    stream.write_all(text.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("reading the answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The `Authorization` header of this node's token (a node without one ignores it).
fn bearer(node: &TestNode) -> String {
    format!("Bearer {}", node.token().unwrap_or("no-token"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn last_seq(node: &TestNode) -> u64 {
    node.status()["last_seq"].as_u64().unwrap()
}

#[test]
fn a_text_plain_post_from_a_page_writes_nothing() {
    // Bug: a page in the operator's browser could send a text/plain POST (no CORS preflight)
    // to /v1/objects, and the node signed and replicated the objects.
    let mut node = TestNode::init("lab-a");
    node.start();
    let before = last_seq(&node);
    let batch = json!([{"type": "Sample", "id": "S-evil", "fields": {"x": 1}}]).to_string();
    let peer = json!({"id": node.id(), "addrs": []}).to_string();
    let auth = bearer(&node);
    for auth in [None, Some(auth.as_str())] {
        for ty in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            let mut headers = vec![("Content-Type", ty)];
            headers.extend(auth.map(|a| ("Authorization", a)));
            let (s, body) = raw(&node, "POST", "/v1/objects", &headers, batch.as_bytes());
            assert!(s == 415 || (auth.is_none() && s == 401), "{ty}: {s} {body}");
            let (s, _) = raw(
                &node,
                "PUT",
                "/v1/objects/Sample/S-evil",
                &headers,
                b"{\"x\":1}",
            );
            assert!(s == 415 || (auth.is_none() && s == 401), "{ty}: {s}");
            let (s, _) = raw(&node, "PUT", "/v1/peers/evil", &headers, peer.as_bytes());
            assert!(s == 415 || (auth.is_none() && s == 401), "{ty}: {s}");
        }
    }
    let (s, body) = raw(
        &node,
        "POST",
        "/v1/objects",
        &[("Authorization", &auth)],
        batch.as_bytes(),
    );
    assert_eq!(s, 415, "no Content-Type at all: {body}");
    assert!(body.contains("application/json"), "{body}");
    assert_eq!(node.get("Sample", "S-evil"), None);
    assert_eq!(last_seq(&node), before);
    assert_eq!(node.status()["peers"], json!([]));
    // The same request as JSON, with the token, is an ordinary write.
    let (s, body) = raw(
        &node,
        "POST",
        "/v1/objects",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        batch.as_bytes(),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(node.get("Sample", "S-evil"), Some(json!({"x": 1})));
    // And the CLI, which deletes through the API, sends the type the node requires.
    node.ok(&["rm", "Sample", "S-evil"]);
    assert_eq!(node.get("Sample", "S-evil"), None);
}

#[test]
fn a_foreign_origin_is_refused() {
    // Bug: the API answered requests from any web page, whatever its Origin.
    let mut node = TestNode::init("lab-a");
    node.start();
    let auth = bearer(&node);
    let json_type = ("Content-Type", "application/json");
    let before = last_seq(&node);
    for origin in [
        "http://evil.example",
        "null",
        "http://localhost:8080",
        "https://attacker.test",
    ] {
        let (s, body) = raw(
            &node,
            "GET",
            "/v1/status",
            &[("Authorization", &auth), ("Origin", origin)],
            b"",
        );
        assert_eq!(s, 403, "{origin}: {body}");
        let (s, _) = raw(
            &node,
            "PUT",
            "/v1/objects/Sample/S-1",
            &[("Authorization", &auth), ("Origin", origin), json_type],
            b"{\"x\":1}",
        );
        assert_eq!(s, 403, "{origin}");
    }
    let (s, _) = raw(
        &node,
        "PUT",
        "/v1/objects/Sample/S-1",
        &[
            ("Authorization", &auth),
            ("Sec-Fetch-Site", "cross-site"),
            json_type,
        ],
        b"{\"x\":1}",
    );
    assert_eq!(s, 403);
    assert_eq!(last_seq(&node), before);
    assert_eq!(node.get("Sample", "S-1"), None);
    // No Origin (the CLI, curl, applications) and the API's own origin are fine.
    let own = format!("http://{}", addr(&node));
    let (s, _) = raw(
        &node,
        "GET",
        "/v1/status",
        &[("Authorization", &auth), ("Origin", &own)],
        b"",
    );
    assert_eq!(s, 200);
    let (s, _) = raw(&node, "GET", "/v1/status", &[("Authorization", &auth)], b"");
    assert_eq!(s, 200);
}

#[test]
fn a_foreign_host_is_refused() {
    // Bug: with DNS rebinding (a name that resolves to 127.0.0.1) a page got the whole API,
    // since the node never looked at the Host header.
    let mut node = TestNode::init_with("lab-a", &["--api-host", "lab-a.example.org"]);
    node.start();
    let auth = bearer(&node);
    let port = addr(&node).rsplit(':').next().unwrap().to_string();
    for host in [
        format!("rebind.attacker.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        "127.0.0.1".to_string(),
        format!("127.0.0.1:{}", port.parse::<u32>().unwrap() + 1),
    ] {
        let (s, body) = raw(
            &node,
            "GET",
            "/v1/status",
            &[("Authorization", &auth), ("Host", &host)],
            b"",
        );
        assert_eq!(s, 421, "{host}: {body}");
        assert!(body.contains("Host"), "{body}");
        let (s, _) = raw(
            &node,
            "PUT",
            "/v1/peers/evil",
            &[
                ("Authorization", &auth),
                ("Host", &host),
                ("Content-Type", "application/json"),
            ],
            json!({"id": node.id()}).to_string().as_bytes(),
        );
        assert_eq!(s, 421, "{host}");
    }
    assert_eq!(node.status()["peers"], json!([]));
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("lab-a.example.org:{port}"),
    ] {
        let (s, body) = raw(
            &node,
            "GET",
            "/v1/status",
            &[("Authorization", &auth), ("Host", &host)],
            b"",
        );
        assert_eq!(s, 200, "{host}: {body}");
    }
}

#[test]
fn bundle_uploads_need_their_own_media_type_and_are_streamed() {
    // Bug: POST /v1/bundles/import took any body (an HTML form's too) and copied it in memory.
    let a = TestNode::init("a");
    let mut b = TestNode::init("b");
    a.add_peer(&b, false);
    b.add_peer(&a, false);
    a.ok(&["put", "Sample", "S-1", r#"{"site":"a"}"#]);
    let bundle = a.dir.path().join("for-b.bundle");
    a.ok(&["export", "--for", "b", "--out", bundle.to_str().unwrap()]);
    b.start();
    let auth = bearer(&b);
    let bytes = std::fs::read(&bundle).unwrap();
    for ty in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/json",
    ] {
        let (s, body) = raw(
            &b,
            "POST",
            "/v1/bundles/import",
            &[("Authorization", &auth), ("Content-Type", ty)],
            &bytes,
        );
        assert_eq!(s, 415, "{ty}: {body}");
        assert!(body.contains("application/vnd.tidesync.bundle"), "{body}");
    }
    assert_eq!(b.get("Sample", "S-1"), None);
    // Garbage of the right type reaches the import and is refused whole; nothing is left in
    // the home.
    let (s, body) = raw(
        &b,
        "POST",
        "/v1/bundles/import",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/vnd.tidesync.bundle"),
        ],
        b"PK\x03\x04 not a bundle",
    );
    assert_eq!(s, 422, "{body}");
    // The CLI uploads the bundle to the running node with the bundle type.
    let report = json(&b.ok(&["import", bundle.to_str().unwrap(), "--json"]));
    assert_eq!(report["new_changes"], json!(1), "{report}");
    assert_eq!(b.get("Sample", "S-1"), Some(json!({"site": "a"})));
    let leftovers: Vec<_> = std::fs::read_dir(b.home())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_home_and_its_secrets_are_private() {
    // Bug: the home was created 0755 and config.toml and store.redb 0644, so any local user
    // could read the whole store; there was no token by default.
    let mut node = TestNode::init("lab-a");
    let home = node.home();
    assert_eq!(mode(&home), 0o700);
    for file in ["api.token", "config.toml", "store.redb", "identity.key"] {
        assert_eq!(mode(&home.join(file)), 0o600, "{file}");
    }
    let token = node.token_file().unwrap();
    assert_eq!(token.len(), 64, "{token}");
    let config = std::fs::read_to_string(home.join("config.toml")).unwrap();
    assert!(
        !config.contains(&token) && !config.contains("token"),
        "{config}"
    );
    node.start();
    assert_eq!(mode(&home.join("node.api")), 0o600);
    // The token is required, and it is read from its file.
    assert_eq!(node.http_with(Method::GET, "/v1/status", None, None).0, 401);
    assert_eq!(node.http(Method::GET, "/v1/status", None).0, 200);
    node.ok(&["put", "Sample", "S-1", r#"{"a":1}"#]);
    // Changing the config through the running node keeps it private and token-free.
    node.ok(&["peer", "add", "x", "--id", &node.id()]);
    assert_eq!(mode(&home.join("config.toml")), 0o600);
    node.stop();
}

/// Turn `node`'s freshly made home into one made before token files: config format 1 (with
/// `token` when given), no token file, modes from a 022 umask.
fn make_old_home(node: &TestNode, token: Option<&str>) {
    let home = node.home();
    let _ = std::fs::remove_file(home.join("api.token"));
    let config = std::fs::read_to_string(home.join("config.toml")).unwrap();
    let mut old: String = config
        .lines()
        .filter(|l| !l.starts_with("format"))
        .map(|l| format!("{l}\n"))
        .collect();
    if let Some(token) = token {
        old = old.replace("[api]\n", &format!("[api]\ntoken = \"{token}\"\n"));
    }
    std::fs::write(home.join("config.toml"), &old).unwrap();
    for (path, m) in [
        (home.clone(), 0o755),
        (home.join("config.toml"), 0o644),
        (home.join("store.redb"), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
    }
}

#[test]
fn an_old_home_gets_a_token_file_at_its_next_start() {
    // Bug: homes had no token (or kept it in config.toml), so any web page could use the API.
    let legacy = "an-old-token-from-config-toml";
    let mut old = TestNode::init("old");
    make_old_home(&old, Some(legacy));
    let mut bare = TestNode::init("bare");
    make_old_home(&bare, None);
    assert_eq!(bare.token_file(), None);
    old.start();
    bare.start();
    // The old config's token moved into the token file, and out of the config.
    assert_eq!(old.token_file().as_deref(), Some(legacy));
    let config = std::fs::read_to_string(old.home().join("config.toml")).unwrap();
    assert!(!config.contains(legacy), "{config}");
    assert!(
        config.contains(&format!("format = {}", tidesync::config::CONFIG_FORMAT)),
        "{config}"
    );
    // A home with no token got a new one.
    let generated = bare.token_file().expect("a token file at start");
    assert_eq!(generated.len(), 64);
    for node in [&old, &bare] {
        let home = node.home();
        assert_eq!(mode(&home.join("api.token")), 0o600);
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&home.join("config.toml")), 0o600);
        assert_eq!(mode(&home.join("store.redb")), 0o600);
        assert_eq!(node.http_with(Method::GET, "/v1/status", None, None).0, 401);
        assert_eq!(node.http(Method::GET, "/v1/status", None).0, 200);
        node.ok(&["put", "Sample", "S-1", r#"{"a":1}"#]);
    }
    assert_eq!(
        old.http_with(Method::GET, "/v1/status", None, Some(legacy))
            .0,
        200
    );
    // A restart keeps the token.
    bare.stop();
    bare.start();
    assert_eq!(bare.token_file(), Some(generated));
    assert_eq!(json(&bare.ok(&["get", "Sample", "S-1"])), json!({"a": 1}));
}

/// How many half-open connections the starvation test holds.
const HALF_OPEN: usize = 60;

#[test]
fn half_open_requests_neither_starve_the_api_nor_stay_open() {
    // Bug: the API had no header-read timeout and no connection cap; 50 half-open requests
    // kept every connection open for 40 s and more.
    let mut node = TestNode::init("lab-a");
    node.start();
    let mut sitting: Vec<TcpStream> = (0..HALF_OPEN)
        .map(|_| {
            let mut s = TcpStream::connect(addr(&node)).unwrap();
            s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127")
                .unwrap();
            s
        })
        .collect();
    // A real request still gets through while they sit.
    let (s, body) = node.http(Method::GET, "/v1/status", None);
    assert_eq!(s, 200, "{body}");
    node.ok(&["put", "Sample", "S-1", r#"{"a":1}"#]);
    // The node closes each of them once the header timeout passes. The bound is generous
    // (a hung test, not a speed goal).
    let deadline = Instant::now() + Duration::from_secs(CONVERGE_TIMEOUT_SECS);
    for s in &mut sitting {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "half-open connections were never closed");
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a half-open connection stayed open: {e}"),
        }
    }
    wait_for("the node still answers", || {
        node.http(Method::GET, "/v1/status", None).0 == 200
    });
}
