//! The checks every API request passes before a handler sees it: `Host` (DNS rebinding),
//! `Origin` and `Sec-Fetch-Site` (web pages), the bearer token, the media type of
//! state-changing requests (HTML forms), and a bounded, timed read of small bodies.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, BUNDLE_IMPORT_PATH, MAX_BODY_BYTES};

/// The media type of every state-changing request but bundle uploads.
pub const JSON_MEDIA_TYPE: &str = "application/json";
/// The media type of a bundle upload (`POST /v1/bundles/import`); no HTML form can send it.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.tidesync.bundle";
/// Longest the server waits for a whole request body of the JSON endpoints (at most
/// [`MAX_BODY_BYTES`]), in seconds; a client that trickles one is answered 408.
pub const BODY_READ_TIMEOUT_SECS: u64 = 60;

/// Who may call the API: the names a request may address it by, its port, and the token.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Lower-case host names and IP literals (IPv6 without brackets) the `Host` may name.
    names: Vec<String>,
    port: u16,
    token: String,
    /// Browser sessions, which stand in for the token (see [`super::login`]).
    logins: Arc<super::login::Logins>,
}

impl Guard {
    /// The guard of an API bound to `bound`, also reachable by `hosts` (from `api.hosts`).
    pub fn new(bound: SocketAddr, hosts: &[String], token: String) -> Guard {
        let mut names = vec![bound.ip().to_string(), "localhost".to_string()];
        names.extend(hosts.iter().map(|h| normalise(h)));
        Guard {
            names,
            port: bound.port(),
            token,
            logins: Arc::default(),
        }
    }

    /// The browser logins this guard accepts (shared with the login routes).
    pub fn logins(&self) -> Arc<super::login::Logins> {
        Arc::clone(&self.logins)
    }

    /// Whether `authority` (`host[:port]`, from `Host` or an `Origin`) names this API.
    /// Without a port it must be 80, as HTTP implies.
    fn names_us(&self, authority: &str) -> bool {
        let Some((host, port)) = split_authority(authority) else {
            return false;
        };
        let port = match port {
            Some(p) => p.parse::<u16>().ok(),
            None => Some(80),
        };
        port == Some(self.port) && self.names.iter().any(|n| *n == normalise(host))
    }

    fn allowed(&self) -> String {
        self.names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) => format!("[{n}]:{}", self.port),
                _ => format!("{n}:{}", self.port),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn check_headers(&self, method: &Method, path: &str, h: &HeaderMap) -> Result<(), ApiError> {
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
        match host {
            Some(host) if self.names_us(host) => {}
            _ => {
                return Err(ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "the Host header ({}) does not name this node's API; use one of {} (add other names to api.hosts in config.toml)",
                        host.unwrap_or("missing"),
                        self.allowed()
                    ),
                ));
            }
        }
        if let Some(origin) = h.get(header::ORIGIN) {
            let ours = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|a| self.names_us(a));
            if !ours {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from web pages are refused (Origin: {})",
                        String::from_utf8_lossy(origin.as_bytes())
                    ),
                ));
            }
        }
        if let Some(site) = h.get("sec-fetch-site")
            && !matches!(site.as_bytes(), b"none" | b"same-origin")
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "requests from web pages are refused (Sec-Fetch-Site)",
            ));
        }
        let given = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let session = || {
            h.get(header::COOKIE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| self.logins.has_session(c))
        };
        if path != super::page::LOGIN_PATH
            && !given.is_some_and(|g| constant_time_eq(g.as_bytes(), self.token.as_bytes()))
            && !session()
        {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (send `Authorization: Bearer <the token in HOME/api.token>`)",
            ));
        }
        if !matches!(*method, Method::GET | Method::HEAD) {
            let want = if path == BUNDLE_IMPORT_PATH {
                BUNDLE_MEDIA_TYPE
            } else if path == super::files::FILES_PATH {
                super::files::FILE_MEDIA_TYPE
            } else {
                JSON_MEDIA_TYPE
            };
            let given = h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
            if given.as_deref() != Some(want) {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "{method} {path} needs Content-Type: {want} (given: {})",
                        given.as_deref().unwrap_or("none")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The middleware: refuse what fails [`Guard`]'s checks; read a JSON endpoint's body whole,
/// within [`MAX_BODY_BYTES`] and [`BODY_READ_TIMEOUT_SECS`] (bundle and file uploads stream
/// instead).
pub async fn guard(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if let Err(e) = guard.check_headers(request.method(), &path, request.headers()) {
        if path == "/" && e.status == StatusCode::UNAUTHORIZED {
            return super::page::logged_out();
        }
        return e.into_response();
    }
    if path == BUNDLE_IMPORT_PATH
        || (path == super::files::FILES_PATH && request.method() == Method::POST)
    {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(Duration::from_secs(BODY_READ_TIMEOUT_SECS), read).await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY_BYTES} bytes, or was cut off"),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_READ_TIMEOUT_SECS} s"),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// `host[:port]` split; IPv6 literals in brackets. `None` when malformed.
fn split_authority(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match authority.split_once(':') {
        Some((host, port)) if !port.contains(':') => Some((host, Some(port))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

/// A host name as compared: lower case, without a trailing dot.
fn normalise(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(
            "127.0.0.1:7401".parse().unwrap(),
            &["Lab-A.example.org".into()],
            "t".repeat(32),
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {}", "t".repeat(32)).parse().unwrap(),
        );
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn status(method: Method, path: &str, pairs: &[(&'static str, &str)]) -> Option<StatusCode> {
        guard()
            .check_headers(&method, path, &headers(pairs))
            .err()
            .map(|e| e.status)
    }

    #[test]
    fn host_must_name_the_bind_address_localhost_or_a_configured_name() {
        for ok in [
            "127.0.0.1:7401",
            "localhost:7401",
            "LOCALHOST.:7401",
            "lab-a.example.org:7401",
        ] {
            assert_eq!(
                status(Method::GET, "/v1/status", &[("host", ok)]),
                None,
                "{ok}"
            );
        }
        for bad in [
            "evil.example:7401",
            "127.0.0.1:7402",
            "127.0.0.1",
            "localhost:x",
            "a:b:c",
            "[::1]:7401",
        ] {
            assert_eq!(
                status(Method::GET, "/v1/status", &[("host", bad)]),
                Some(StatusCode::MISDIRECTED_REQUEST),
                "{bad}"
            );
        }
        assert_eq!(
            status(Method::GET, "/v1/status", &[]),
            Some(StatusCode::MISDIRECTED_REQUEST)
        );
    }

    #[test]
    fn foreign_origins_and_cross_site_fetches_are_refused() {
        let host = ("host", "127.0.0.1:7401");
        assert_eq!(
            status(
                Method::GET,
                "/v1/status",
                &[host, ("origin", "http://localhost:7401")]
            ),
            None
        );
        for bad in [
            "http://evil.example",
            "null",
            "https://127.0.0.1:7401",
            "http://localhost:8080",
        ] {
            assert_eq!(
                status(Method::GET, "/v1/status", &[host, ("origin", bad)]),
                Some(StatusCode::FORBIDDEN),
                "{bad}"
            );
        }
        assert_eq!(
            status(
                Method::GET,
                "/v1/status",
                &[host, ("sec-fetch-site", "cross-site")]
            ),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(
                Method::GET,
                "/v1/status",
                &[host, ("sec-fetch-site", "none")]
            ),
            None
        );
    }

    #[test]
    fn state_changes_need_their_media_type() {
        let host = ("host", "127.0.0.1:7401");
        let json = ("content-type", "application/json; charset=utf-8");
        assert_eq!(status(Method::POST, "/v1/objects", &[host, json]), None);
        assert_eq!(
            status(Method::DELETE, "/v1/objects/S/1", &[host, json]),
            None
        );
        for form in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            assert_eq!(
                status(
                    Method::PUT,
                    "/v1/objects/S/1",
                    &[host, ("content-type", form)]
                ),
                Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            );
            assert_eq!(
                status(
                    Method::POST,
                    BUNDLE_IMPORT_PATH,
                    &[host, ("content-type", form)]
                ),
                Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            );
        }
        assert_eq!(
            status(
                Method::POST,
                BUNDLE_IMPORT_PATH,
                &[host, ("content-type", BUNDLE_MEDIA_TYPE)]
            ),
            None
        );
        assert_eq!(
            status(Method::POST, "/v1/objects", &[host]),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"short", b"longer"));
        let h = {
            let mut h = headers(&[("host", "127.0.0.1:7401")]);
            h.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
            h
        };
        assert_eq!(
            guard()
                .check_headers(&Method::GET, "/v1/status", &h)
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
    }
}
