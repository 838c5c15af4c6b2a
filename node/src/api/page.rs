//! The status page at `GET /`: server-rendered HTML, readable without JavaScript, that a small
//! script keeps current by fetching `GET /page/body` (the same renderer) every
//! [`PAGE_REFRESH_MS`] and that resolves concurrent values through the JSON API. A browser
//! gets in through a login code (see [`super::login`]).

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::ApiError;
use super::login::Logins;
use crate::core::{Conflict, Feed, Status};
use crate::node::NodeHandle;

/// Where a browser trades a login code for a session.
pub const LOGIN_PATH: &str = "/login";
/// Where the page's script fetches the page's body again.
pub const BODY_PATH: &str = "/page/body";
/// Where `tidesync open` asks for a login code (with the API token).
pub const LOGIN_CODES_PATH: &str = "/v1/login-codes";
/// How often the page's script fetches the body again, in milliseconds.
pub const PAGE_REFRESH_MS: u64 = 1_000;
/// Most recent changes the page shows.
pub const PAGE_RECENT_CHANGES: u64 = 20;

/// HTML-escape `s`.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A Unix time in milliseconds, as the page shows it: how long ago, and the UTC time.
fn ago(ms: i64, now_ms: i64) -> String {
    let secs = (now_ms.saturating_sub(ms) / 1000).max(0);
    let rel = match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    };
    let abs = crate::when::rfc3339_or_number(ms);
    format!("<time title=\"{}\">{}</time>", esc(&abs), esc(&rel))
}

/// What the page shows, read just now.
struct View {
    status: Status,
    conflicts: Vec<Conflict>,
    fleet: Vec<crate::reads::FleetNode>,
    recent: Feed,
    now_ms: i64,
}

impl View {
    async fn read(node: &NodeHandle) -> Result<View, ApiError> {
        let status = node.status().await?;
        let conflicts = node.conflicts().await?;
        let fleet = node.fleet().await?;
        let since = status.last_seq.saturating_sub(PAGE_RECENT_CHANGES);
        let recent = node
            .changes(
                since,
                PAGE_RECENT_CHANGES as usize,
                std::time::Duration::ZERO,
                None,
            )
            .await?;
        Ok(View {
            status,
            conflicts,
            fleet,
            recent,
            now_ms: crate::replica::system_now_ms(),
        })
    }

    /// A node's name as the page shows it: this node, a configured peer's name, or its id.
    fn who(&self, id: &str) -> String {
        if id == self.status.node {
            return format!("{} (this node)", esc(&self.status.name));
        }
        match self.status.peers.iter().find(|p| p.id == id) {
            Some(p) => esc(&p.name),
            None => format!("<code>…{}</code>", esc(&id[id.len().saturating_sub(8)..])),
        }
    }

    fn body(&self) -> String {
        let s = &self.status;
        let mut h = String::new();
        let fingerprint = s
            .node
            .parse::<tidesync_proto::NodeId>()
            .map(|n| n.fingerprint())
            .unwrap_or_default();
        let objects: u64 = s.objects.values().map(|c| c.live).sum();
        let _ = write!(
            h,
            "<section id=\"node\"><h1>tidesync · {}</h1><dl>\
             <dt>Node id</dt><dd><code>{}</code></dd>\
             <dt>Key fingerprint</dt><dd><code id=\"fingerprint\">{}</code> (a peer's operator reads the same)</dd>\
             <dt>Store</dt><dd>{} objects, {} bytes, log at {}</dd>\
             <dt>Files</dt><dd>{} wanted, {} bytes missing</dd></dl></section>",
            esc(&s.name),
            esc(&s.node),
            esc(&fingerprint),
            objects,
            s.store_bytes,
            s.last_seq,
            s.files.wanted,
            s.files.missing_bytes,
        );
        self.peers(&mut h);
        self.fleet(&mut h);
        self.inbox(&mut h);
        self.recent(&mut h);
        h
    }

    fn peers(&self, h: &mut String) {
        let s = &self.status;
        let _ = write!(
            h,
            "<section id=\"peers\"><h2>Peers ({})</h2><table><thead><tr><th>Peer</th><th>State</th>\
             <th>Lag out / in</th><th>Last sync</th><th>Refused</th><th>Held</th>\
             <th>Files wanted</th><th>Policy</th></tr></thead><tbody>",
            s.peers.len()
        );
        for p in &s.peers {
            let state = match (p.connected, p.connected_since_ms) {
                (true, Some(since)) => format!(
                    "online{} since {}",
                    p.via
                        .as_deref()
                        .map(|v| format!(" over {v}"))
                        .unwrap_or_default(),
                    ago(since, self.now_ms)
                ),
                (true, None) => "online".into(),
                (false, _) => "offline".into(),
            };
            let last = p
                .last_sync_ms
                .map(|t| ago(t, self.now_ms))
                .unwrap_or_else(|| "never".into());
            let wanted = s.files.peers.get(&p.id).map_or(0, |f| f.wanted);
            let policy = serde_json::to_value(&p.policy)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| match v {
                            serde_json::Value::String(s) => format!("{k} {s}"),
                            other => format!("{k} {other}"),
                        })
                        .collect::<Vec<_>>()
                        .join(" · ")
                })
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr class=\"peer {cls}\" data-peer=\"{name}\"><td>{name}</td><td class=\"state\">{state}</td>\
                 <td>{out} / {inn}</td><td>{last}</td><td>{refused}</td><td>{held}</td>\
                 <td>{wanted}</td><td class=\"policy\">{policy}</td></tr>",
                cls = if p.connected { "online" } else { "offline" },
                name = esc(&p.name),
                out = p.pending_out,
                inn = p.pending_in,
                refused = p.rejected,
                held = p.held,
                policy = esc(&policy),
            );
        }
        h.push_str("</tbody></table></section>");
    }

    fn fleet(&self, h: &mut String) {
        let _ = write!(
            h,
            "<section id=\"fleet\"><h2>Fleet ({})</h2><table><thead><tr><th>Node</th>\
             <th>Fingerprint</th><th>Status as of</th><th>Version</th><th>Its peers</th>\
             <th>Held</th><th>Refused</th><th>Files wanted</th><th>Store</th><th>Last bundle</th>\
             </tr></thead><tbody>",
            self.fleet.len()
        );
        for n in &self.fleet {
            let (asof, version, peers, held, refused, wanted, store) = match &n.record {
                Some(r) => (
                    ago(r.made_ms, self.now_ms),
                    esc(&r.version),
                    r.peers
                        .iter()
                        .map(|p| {
                            format!(
                                "{} {} (lag {}/{})",
                                esc(&p.name),
                                if p.connected { "online" } else { "offline" },
                                p.lag_out,
                                p.lag_in
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.held_changes.to_string(),
                    r.refusals.to_string(),
                    r.files_wanted.to_string(),
                    format!("{} objects, {} bytes", r.objects, r.store_bytes),
                ),
                None => (
                    "never".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ),
            };
            let _ = write!(
                h,
                "<tr class=\"fleet-node\" data-node=\"{}\"><td>{}</td><td><code>{}</code></td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&n.name),
                esc(&n.name),
                esc(&n.fingerprint),
                asof,
                version,
                peers,
                held,
                refused,
                wanted,
                store,
                n.bundle_ms
                    .map(|b| ago(b, self.now_ms))
                    .unwrap_or_else(|| "none".into()),
            );
        }
        h.push_str("</tbody></table></section>");
    }

    fn inbox(&self, h: &mut String) {
        let _ = write!(
            h,
            "<section id=\"inbox\"><h2>Conflicts inbox ({})</h2>",
            self.conflicts.len()
        );
        if self.conflicts.is_empty() {
            h.push_str("<p>Nothing to look at.</p>");
        }
        for c in &self.conflicts {
            let _ = write!(
                h,
                "<div class=\"item\" data-kind=\"{}\"><h3>{} <code>{}/{}</code></h3>",
                esc(&c.kind),
                esc(&c.kind),
                esc(&c.ty),
                esc(if c.local_id.is_empty() {
                    &c.id
                } else {
                    &c.local_id
                })
            );
            for f in &c.fields {
                let _ = write!(
                    h,
                    "<p>Field <code>{}</code> has concurrent values:</p><ul>",
                    esc(&f.path)
                );
                for v in &f.values {
                    let _ = write!(
                        h,
                        "<li><code class=\"value\">{}</code> by {}{}{} \
                         <button class=\"pick\" data-type=\"{}\" data-id=\"{}\" data-path=\"{}\" data-pick=\"{}\">Keep this value</button></li>",
                        esc(&v.value.to_string()),
                        v.author
                            .as_deref()
                            .map(|a| self.who(a))
                            .unwrap_or_else(|| "an unknown actor".into()),
                        v.time_ms
                            .map(|t| format!(", {}", ago(t, self.now_ms)))
                            .unwrap_or_default(),
                        if v.winner {
                            " <em>(shown now)</em>"
                        } else {
                            ""
                        },
                        esc(&c.ty),
                        esc(&c.local_id),
                        esc(&f.path),
                        esc(&v.id),
                    );
                }
                h.push_str("</ul>");
            }
            let detail = if let Some(r) = &c.refusal {
                format!(
                    "from {}: {} ({}), {}",
                    self.who(&r.peer),
                    esc(&r.reason),
                    esc(&r.rule),
                    ago(r.time_ms, self.now_ms)
                )
            } else if let Some(w) = &c.held {
                format!(
                    "{} changes held since {}, waiting for {}",
                    w.changes,
                    ago(w.since_ms, self.now_ms),
                    if w.waiting_for.is_empty() {
                        "nothing missing".into()
                    } else {
                        esc(&w.waiting_for.join(", "))
                    }
                )
            } else if let Some(f) = &c.file {
                format!(
                    "file <code>{}</code> ({} bytes, {} of {} segments): {}",
                    esc(&f.hash),
                    f.size,
                    f.segments_done,
                    f.segments,
                    esc(&f.why)
                )
            } else if let Some(e) = &c.equivocation {
                format!(
                    "{} signed two changes as one actor and sequence number ({}): both are refused",
                    self.who(&e.author),
                    e.seq
                )
            } else if c.fields.is_empty() {
                format!(
                    "kept here as <code>{}</code>; the name is held by {} \
                     <button class=\"rename\" data-type=\"{}\" data-id=\"{}\">Rename this one</button>",
                    esc(&c.local_id),
                    esc(c.holder.as_deref().unwrap_or("-")),
                    esc(&c.ty),
                    esc(&c.local_id),
                )
            } else {
                String::new()
            };
            if !detail.is_empty() {
                let _ = write!(h, "<p>{detail}</p>");
            }
            h.push_str("</div>");
        }
        h.push_str("</section>");
    }

    fn recent(&self, h: &mut String) {
        h.push_str(
            "<section id=\"recent\"><h2>Recent changes</h2><table><thead><tr><th>SEQ</th>\
             <th>Object</th><th>Author</th><th>When</th></tr></thead><tbody>",
        );
        for e in self.recent.changes.iter().rev() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}/{}</code></td><td>{}</td><td>{}</td></tr>",
                e.seq,
                esc(&e.ty),
                esc(&e.id),
                self.who(&e.author),
                ago(e.time_ms, self.now_ms)
            );
        }
        h.push_str("</tbody></table></section>");
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em}\
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}\
tr.offline td.state{color:#a00}tr.online td.state{color:#070}.item{border-left:4px solid #c80;\
padding:.2em .8em;margin:.6em 0}dt{font-weight:bold}code{font-size:90%}";

/// The script: fetch the body again every PAGE_REFRESH_MS; resolve and rename through the JSON
/// API.
fn script() -> String {
    format!(
        r#"const main = document.getElementById('main');
async function refresh() {{
  try {{
    const r = await fetch('{BODY_PATH}', {{credentials: 'same-origin'}});
    if (r.ok) {{ main.innerHTML = await r.text(); document.body.dataset.refreshed = Date.now(); }}
  }} catch (e) {{}}
}}
setInterval(refresh, {PAGE_REFRESH_MS});
async function post(b, action, body) {{
  const url = '/v1/objects/' + encodeURIComponent(b.dataset.type) + '/' + encodeURIComponent(b.dataset.id) + '/' + action;
  return fetch(url, {{method: 'POST', credentials: 'same-origin',
    headers: {{'Content-Type': 'application/json'}}, body: JSON.stringify(body)}});
}}
main.addEventListener('click', async (ev) => {{
  const say = (t) => {{ document.getElementById('message').textContent = t; }};
  const pick = ev.target.closest('button.pick');
  if (pick) {{
    const r = await post(pick, 'resolve', {{path: pick.dataset.path, pick: pick.dataset.pick}});
    say(r.ok ? 'Resolved.' : 'Could not resolve: ' + (await r.text()));
  }}
  const rename = ev.target.closest('button.rename');
  if (rename) {{
    const to = window.prompt('New name on this node for ' + rename.dataset.type + '/' + rename.dataset.id + ' (names are local):');
    if (!to) return;
    const r = await post(rename, 'rename', {{to}});
    say(r.ok ? 'Renamed to ' + to + '.' : 'Could not rename: ' + (await r.text()));
  }}
  refresh();
}});"#
    )
}

/// `GET /`: the whole page.
pub async fn page(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    let view = View::read(&node).await?;
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tidesync · {}</title>\
         <style>{STYLE}</style></head><body><p id=\"message\" role=\"status\"></p>\
         <main id=\"main\">{}</main><script>{}</script></body></html>",
        esc(&view.status.name),
        view.body(),
        script()
    );
    Ok(no_store(Html(html).into_response()))
}

/// `GET /page/body`: the page's body alone, for its script.
pub async fn body(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    let view = View::read(&node).await?;
    Ok(no_store(Html(view.body()).into_response()))
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The page a browser without a session sees.
pub fn logged_out() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tidesync</title></head>\
             <body><h1>tidesync</h1><p>Run <code>tidesync open</code> on the node's machine: it prints \
             a link with a one-time login code.</p></body></html>",
        ),
    )
        .into_response()
}

/// The query of `GET /login`.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    code: String,
}

/// `GET /login?code=`: trade a one-time code for a session cookie, then go to the page.
pub async fn login(State(logins): State<Arc<Logins>>, Query(q): Query<LoginQuery>) -> Response {
    match logins.redeem(&q.code) {
        Some(session) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, Logins::cookie(&session)),
                (header::LOCATION, "/".to_string()),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
        )
            .into_response(),
        None => (
            StatusCode::FORBIDDEN,
            Html(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tidesync</title></head>\
                 <body><p>This login code is unknown, used or expired. Run <code>tidesync open</code> again.</p></body></html>",
            ),
        )
            .into_response(),
    }
}

/// `POST /v1/login-codes`: a new one-time login code, `{"code", "path"}`.
pub async fn new_code(State(logins): State<Arc<Logins>>) -> axum::Json<serde_json::Value> {
    let code = logins.new_code();
    axum::Json(serde_json::json!({
        "path": format!("{LOGIN_PATH}?code={code}"),
        "code": code,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_a_peer_or_writer_chose_is_escaped() {
        assert_eq!(
            esc("<script>\"a\"&'b'</script>"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn times_read_as_how_long_ago() {
        assert!(ago(0, 30_000).contains("30 s ago"));
        assert!(ago(0, 3 * 86_400_000).contains("3 days ago"));
        assert!(ago(0, 0).contains("1970-01-01T00:00:00Z"));
    }
}
