//! Browser logins to the status page: one-time login codes (made by `tidesync open` with the
//! API token) that a browser trades at `GET /login?code=` for a session cookie, HttpOnly and
//! SameSite=Strict, so the token never sits in a browser's history or reach of a script.
//!
//! Codes and sessions live in memory: a restarted node forgets them and `tidesync open` is
//! run again. Both are bounded; the oldest go first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a login code may be used, in seconds.
pub const LOGIN_CODE_TTL_SECS: u64 = 120;
/// How long a browser session lasts, in seconds.
pub const SESSION_TTL_SECS: u64 = 12 * 3600;
/// Most unused login codes kept.
pub const MAX_LOGIN_CODES: usize = 16;
/// Most browser sessions kept.
pub const MAX_SESSIONS: usize = 64;
/// The cookie that carries a session.
pub const SESSION_COOKIE: &str = "tidesync_session";
/// Bytes of randomness in a code and in a session id.
const SECRET_BYTES: usize = 32;

/// The login codes not yet used and the sessions they opened, with when each expires.
#[derive(Debug, Default)]
pub struct Logins {
    codes: Mutex<HashMap<String, Instant>>,
    sessions: Mutex<HashMap<String, Instant>>,
}

fn secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

/// Keep at most `max - 1` live entries of `map` (dropping the expired, then the soonest to
/// expire), to make room for one more.
fn make_room(map: &mut HashMap<String, Instant>, max: usize, now: Instant) {
    map.retain(|_, expires| *expires > now);
    while map.len() >= max {
        let Some(oldest) = map.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) else {
            break;
        };
        map.remove(&oldest);
    }
}

impl Logins {
    /// A new one-time login code.
    pub fn new_code(&self) -> String {
        let now = Instant::now();
        let code = secret();
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        make_room(&mut codes, MAX_LOGIN_CODES, now);
        codes.insert(code.clone(), now + Duration::from_secs(LOGIN_CODE_TTL_SECS));
        code
    }

    /// Trade a login code for a new session id; `None` if the code is unknown, used or
    /// expired.
    pub fn redeem(&self, code: &str) -> Option<String> {
        let now = Instant::now();
        let expires = self
            .codes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(code)?;
        if expires <= now {
            return None;
        }
        let session = secret();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        make_room(&mut sessions, MAX_SESSIONS, now);
        sessions.insert(session.clone(), now + Duration::from_secs(SESSION_TTL_SECS));
        Some(session)
    }

    /// Whether a request's `Cookie` header carries a live session.
    pub fn has_session(&self, cookie_header: &str) -> bool {
        let now = Instant::now();
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        cookie_header
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .filter(|(name, _)| *name == SESSION_COOKIE)
            .any(|(_, value)| sessions.get(value).is_some_and(|e| *e > now))
    }

    /// The `Set-Cookie` value for `session`.
    pub fn cookie(session: &str) -> String {
        format!(
            "{SESSION_COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_TTL_SECS}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_opens_one_session_once() {
        let logins = Logins::default();
        let code = logins.new_code();
        let session = logins.redeem(&code).expect("a fresh code is good");
        assert!(logins.redeem(&code).is_none(), "codes are one-time");
        assert!(logins.redeem("nope").is_none());
        assert!(logins.has_session(&format!("a=b; {SESSION_COOKIE}={session}")));
        assert!(!logins.has_session(&format!("{SESSION_COOKIE}=x{session}")));
        assert!(!logins.has_session("other=1"));
        assert!(Logins::cookie(&session).contains("HttpOnly; SameSite=Strict"));
    }

    #[test]
    fn codes_and_sessions_are_bounded() {
        let logins = Logins::default();
        let codes: Vec<_> = (0..MAX_LOGIN_CODES * 2)
            .map(|_| logins.new_code())
            .collect();
        assert_eq!(logins.codes.lock().unwrap().len(), MAX_LOGIN_CODES);
        assert!(
            logins.redeem(&codes[0]).is_none(),
            "the oldest code made room"
        );
        assert!(logins.redeem(codes.last().unwrap()).is_some());
        for _ in 0..MAX_SESSIONS * 2 {
            let code = logins.new_code();
            logins.redeem(&code).unwrap();
        }
        assert_eq!(logins.sessions.lock().unwrap().len(), MAX_SESSIONS);
    }
}
