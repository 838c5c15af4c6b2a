//! What the operator lets a link carry to one peer: sync windows, a byte budget per day and a
//! rate, decided here from the time and the day's meter handed in. Windows and days are in
//! UTC, or in the link's named time zone (`zone = "Europe/Oslo"`, IANA names, from the time
//! zone database built into the binary, so a ship's clock setting does not matter).
//!
//! The gate is checked before each batch and each file segment served. When a window closes
//! the batches in flight finish and no new one starts; when the day's budget is spent nothing
//! more goes until the next day; the rate spaces batches so that on average no more than
//! `max-rate` bytes a second leave. `tidesync sync --now PEER` opens the gate once, until that
//! peer is in sync.

use serde::{Deserialize, Serialize};

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;
/// Most sync windows one peer may have.
pub const MAX_WINDOWS: usize = 24;
/// Percent of a day's budget that file segments may spend; the rest is kept for record
/// changes, so a day of imagery never spends what the records written after it need.
pub const FILES_BUDGET_PERCENT: u64 = 80;

/// A daily sync window, `HH:MM-HH:MM` in UTC or the link's zone; one that ends before it
/// starts spans midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    /// Minutes after midnight (UTC, or in the link's zone).
    pub start: u16,
    pub end: u16,
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Window, String> {
        let bad = || format!("window {s:?} is not HH:MM-HH:MM (00:00 to 24:00)");
        let minutes = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!("window {s:?} is empty"));
        }
        Ok(Window { start, end })
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        format!(
            "{:02}:{:02}-{:02}:{:02}",
            w.start / 60,
            w.start % 60,
            w.end / 60,
            w.end % 60
        )
    }
}

impl Window {
    /// Whether the window holds `minute` (after midnight).
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// The link settings of one peer (part of its policy, `config.toml` and `peer add`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Link {
    /// Most bytes a second sent to the peer, on average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
    /// When the link may carry anything; none: always.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
    /// Most bytes sent to the peer per day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
    /// The time zone of the windows and of the budget's days; none: UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<Zone>,
    /// Which of the peer's addresses to dial first, falling back to the others; none: all of
    /// them at once, the first to connect wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefer: Option<Transport>,
}

/// A transport a peer's address names: `/tcp/` (Noise and Yamux over TCP) or `/udp/.../quic-v1`
/// (QUIC, which carries TLS and its own streams). On a lossy link (a satellite) QUIC recovers
/// a lost packet without stalling the other streams behind it, and survives an address
/// change; on a clean one either will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    /// The transport address `addr` is dialled over, if it names one we speak.
    pub fn of(addr: &libp2p::Multiaddr) -> Option<Transport> {
        use libp2p::multiaddr::Protocol;
        let mut tcp = false;
        for p in addr.iter() {
            match p {
                Protocol::QuicV1 => return Some(Transport::Quic),
                Protocol::Tcp(_) => tcp = true,
                _ => {}
            }
        }
        tcp.then_some(Transport::Tcp)
    }

    /// Its name in status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        }
    }
}

/// A named time zone (IANA, such as `Europe/Oslo`), checked against the built-in time zone
/// database when it is read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Zone {
    name: String,
    tz: jiff::tz::TimeZone,
}

impl TryFrom<String> for Zone {
    type Error = String;
    fn try_from(name: String) -> Result<Zone, String> {
        match jiff::tz::TimeZone::get(&name) {
            Ok(tz) => Ok(Zone { name, tz }),
            Err(e) => Err(format!(
                "unknown time zone {name:?} ({e}); name one as the time zone database does, such as Europe/Oslo or America/Halifax, or leave it out for UTC"
            )),
        }
    }
}

impl From<Zone> for String {
    fn from(z: Zone) -> String {
        z.name
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name == other.name
    }
}

impl Eq for Zone {}

impl Zone {
    /// The zone's offset from UTC at `ms` (Unix ms), in milliseconds.
    fn offset_ms(&self, ms: i64) -> i64 {
        jiff::Timestamp::from_millisecond(ms)
            .map(|t| i64::from(self.tz.to_offset(t).seconds()) * 1_000)
            .unwrap_or(0)
    }
}

/// Bytes sent to one peer on one day (kept in the store, so a restart keeps counting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// Days since 1970-01-01, in UTC or the link's zone ([`Link::day`]).
    pub day: i64,
    pub bytes: u64,
}

/// Why nothing goes to a peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum HeldBack {
    /// Outside every window; the next opens at `opens_ms`.
    OutsideWindow { opens_ms: i64 },
    /// The day's budget is spent; it resets at `resets_ms` (midnight, UTC or the link's zone).
    BudgetSpent { resets_ms: i64 },
    /// The next batch needs more bytes than are left of the day's budget.
    BudgetShort {
        needs: u64,
        left: u64,
        budget: u64,
        resets_ms: i64,
    },
    /// The rate allows the next batch at `at_ms`.
    Rate { at_ms: i64 },
}

impl std::fmt::Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |ms: i64| crate::when::rfc3339_or_number(ms);
        match self {
            HeldBack::OutsideWindow { opens_ms } => {
                write!(
                    f,
                    "outside its sync windows; the next opens at {}",
                    at(*opens_ms)
                )
            }
            HeldBack::BudgetSpent { resets_ms } => {
                write!(
                    f,
                    "its daily budget is spent; it resets at {}",
                    at(*resets_ms)
                )
            }
            HeldBack::BudgetShort { needs, budget, .. } if needs > budget => write!(
                f,
                "its next batch needs {needs} bytes, more than the whole daily budget of \
                 {budget}: only `tidesync sync --now` sends it"
            ),
            HeldBack::BudgetShort {
                needs,
                left,
                resets_ms,
                ..
            } => write!(
                f,
                "its next batch needs {needs} bytes and {left} are left of the day's budget; \
                 it resets at {}",
                at(*resets_ms)
            ),
            HeldBack::Rate { at_ms } => write!(f, "paced by max-rate until {}", at(*at_ms)),
        }
    }
}

impl Meter {
    /// The meter as of `day` (see [`Link::day`]): a new day starts at zero.
    pub fn on_day(self, day: i64) -> Meter {
        if day == self.day {
            self
        } else {
            Meter { day, bytes: 0 }
        }
    }
}

impl Link {
    /// Whether nothing is set: the config leaves the table out.
    pub fn is_default(&self) -> bool {
        *self == Link::default()
    }

    /// Whether the link is shaped at all.
    pub fn is_open_always(&self) -> bool {
        self.max_rate.is_none() && self.windows.is_empty() && self.budget.is_none()
    }

    /// `now_ms` moved to the link's local time (itself in UTC).
    fn local(&self, now_ms: i64) -> i64 {
        match &self.zone {
            Some(z) => now_ms.saturating_add(z.offset_ms(now_ms)),
            None => now_ms,
        }
    }

    /// The instant (Unix ms) of local time `local_ms`, taking the zone's offset near it.
    fn instant(&self, local_ms: i64) -> i64 {
        match &self.zone {
            Some(z) => {
                let guess = local_ms.saturating_sub(z.offset_ms(local_ms));
                local_ms.saturating_sub(z.offset_ms(guess))
            }
            None => local_ms,
        }
    }

    /// The budget's day at `now_ms`: days since 1970-01-01 in UTC or the link's zone.
    pub fn day(&self, now_ms: i64) -> i64 {
        self.local(now_ms).div_euclid(DAY_MS)
    }

    /// When the budget's next day starts after `now_ms` (Unix ms).
    pub fn next_day_ms(&self, now_ms: i64) -> i64 {
        self.instant((self.day(now_ms) + 1) * DAY_MS)
    }

    /// Why nothing may go now, if so: `meter` is the day's bytes so far, `next_ms` when the
    /// rate allows the next send.
    pub fn held_back(&self, meter: Meter, next_ms: i64, now_ms: i64) -> Option<HeldBack> {
        if !self.windows.is_empty() {
            let minute = (self.local(now_ms).rem_euclid(DAY_MS) / 60_000) as u16;
            if !self.windows.iter().any(|w| w.contains(minute)) {
                return Some(HeldBack::OutsideWindow {
                    opens_ms: self.next_open(now_ms),
                });
            }
        }
        if let Some(budget) = self.budget
            && meter.on_day(self.day(now_ms)).bytes >= budget
        {
            return Some(HeldBack::BudgetSpent {
                resets_ms: self.next_day_ms(now_ms),
            });
        }
        if self.max_rate.is_some() && next_ms > now_ms {
            return Some(HeldBack::Rate { at_ms: next_ms });
        }
        None
    }

    /// Why a file segment of `bytes` may not go now, if so: as [`Link::held_back`], but the
    /// day's file segments, this one included, may spend only [`FILES_BUDGET_PERCENT`] of
    /// the budget.
    pub fn files_held_back(
        &self,
        meter: Meter,
        bytes: u64,
        next_ms: i64,
        now_ms: i64,
    ) -> Option<HeldBack> {
        if let Some(budget) = self.budget {
            let share = (u128::from(budget) * u128::from(FILES_BUDGET_PERCENT) / 100) as u64;
            if meter.on_day(self.day(now_ms)).bytes.saturating_add(bytes) > share {
                return Some(HeldBack::BudgetSpent {
                    resets_ms: self.next_day_ms(now_ms),
                });
            }
        }
        let unbudgeted = Link {
            budget: None,
            ..self.clone()
        };
        unbudgeted.held_back(meter, next_ms, now_ms)
    }

    /// Minutes a day the windows leave open (all 1,440 without windows; overlaps counted once).
    pub fn open_minutes_per_day(&self) -> u64 {
        if self.windows.is_empty() {
            return 1_440;
        }
        (0..1_440u16)
            .filter(|m| self.windows.iter().any(|w| w.contains(*m)))
            .count() as u64
    }

    /// When the next window opens after `now_ms`.
    fn next_open(&self, now_ms: i64) -> i64 {
        let local = self.local(now_ms);
        let day = local.div_euclid(DAY_MS) * DAY_MS;
        let minute = local.rem_euclid(DAY_MS) / 60_000;
        self.windows
            .iter()
            .map(|w| {
                let start = i64::from(w.start);
                let opens = if start > minute {
                    day + start * 60_000
                } else {
                    day + DAY_MS + start * 60_000
                };
                self.instant(opens)
            })
            .min()
            .unwrap_or(now_ms)
    }

    /// When the next send may start after `bytes` left at `now_ms`, at the rate.
    pub fn next_send(&self, bytes: u64, now_ms: i64) -> i64 {
        match self.max_rate {
            Some(rate) if rate > 0 => now_ms
                .saturating_add((bytes.saturating_mul(1000) / rate).min(i64::MAX as u64) as i64),
            _ => now_ms,
        }
    }

    /// Check the settings a user gave.
    pub fn validate(&self) -> Result<(), String> {
        if self.windows.len() > MAX_WINDOWS {
            return Err(format!("at most {MAX_WINDOWS} sync windows"));
        }
        if self.max_rate == Some(0) {
            return Err("max-rate must be at least 1 byte a second".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: i64, m: i64) -> i64 {
        20_000 * DAY_MS + (h * 60 + m) * 60_000
    }

    fn window(s: &str) -> Window {
        Window::try_from(s.to_string()).unwrap()
    }

    #[test]
    fn windows_parse_print_and_span_midnight() {
        assert_eq!(String::from(window("02:00-05:30")), "02:00-05:30");
        for bad in [
            "2-5",
            "02:00",
            "25:00-01:00",
            "02:60-03:00",
            "03:00-03:00",
            "x-y",
        ] {
            assert!(Window::try_from(bad.to_string()).is_err(), "{bad}");
        }
        let link = Link {
            windows: vec![window("22:00-02:00")],
            ..Link::default()
        };
        assert_eq!(link.held_back(Meter::default(), 0, at(23, 0)), None);
        assert_eq!(link.held_back(Meter::default(), 0, at(1, 59)), None);
        assert_eq!(
            link.held_back(Meter::default(), 0, at(2, 0)),
            Some(HeldBack::OutsideWindow {
                opens_ms: at(22, 0)
            })
        );
    }

    #[test]
    fn the_budget_is_per_utc_day_and_the_rate_spaces_sends() {
        let link = Link {
            budget: Some(1_000),
            max_rate: Some(100),
            ..Link::default()
        };
        let today = Meter {
            day: at(10, 0).div_euclid(DAY_MS),
            bytes: 1_000,
        };
        assert_eq!(
            link.held_back(today, 0, at(10, 0)),
            Some(HeldBack::BudgetSpent {
                resets_ms: at(24, 0)
            })
        );
        // The next day starts from zero.
        assert_eq!(link.held_back(today, 0, at(24, 1)), None);
        let next = link.next_send(500, at(10, 0));
        assert_eq!(next, at(10, 0) + 5_000);
        let spare = Meter {
            day: today.day,
            bytes: 0,
        };
        assert_eq!(
            link.held_back(spare, next, at(10, 0)),
            Some(HeldBack::Rate { at_ms: next })
        );
        assert_eq!(link.held_back(spare, next, next), None);
    }

    #[test]
    fn files_may_spend_only_their_share_of_the_budget() {
        let link = Link {
            budget: Some(1_000),
            ..Link::default()
        };
        let spent = |bytes| Meter {
            day: at(10, 0).div_euclid(DAY_MS),
            bytes,
        };
        assert_eq!(link.files_held_back(spent(700), 100, 0, at(10, 0)), None);
        assert!(
            link.files_held_back(spent(700), 101, 0, at(10, 0))
                .is_some()
        );
        assert!(link.files_held_back(spent(800), 1, 0, at(10, 0)).is_some());
        // Records still have the rest of the day's budget.
        assert_eq!(link.held_back(spent(800), 0, at(10, 0)), None);
    }

    fn zone(name: &str) -> Option<Zone> {
        Some(Zone::try_from(name.to_string()).unwrap())
    }

    #[test]
    fn windows_and_days_follow_a_named_zone() {
        // 2024-10-04: Auckland keeps daylight time, UTC+13.
        let link = Link {
            windows: vec![window("02:00-05:00")],
            budget: Some(1_000),
            zone: zone("Pacific/Auckland"),
            ..Link::default()
        };
        // 13:30 UTC is 02:30 the next day in Auckland: open.
        assert_eq!(link.held_back(Meter::default(), 0, at(13, 30)), None);
        assert_eq!(
            link.held_back(Meter::default(), 0, at(12, 0)),
            Some(HeldBack::OutsideWindow {
                opens_ms: at(13, 0)
            })
        );
        // The budget's day turns at local midnight, 11:00 UTC.
        assert_eq!(link.day(at(10, 59)), 20_000);
        assert_eq!(link.day(at(11, 0)), 20_001);
        let spent = Meter {
            day: 20_001,
            bytes: 1_000,
        };
        assert_eq!(
            link.held_back(spent, 0, at(13, 30)),
            Some(HeldBack::BudgetSpent {
                resets_ms: at(35, 0)
            })
        );
        // Oslo leaves summer time on 2024-10-27: midnight is 22:00 UTC before, 23:00 after.
        let oslo = Link {
            zone: zone("Europe/Oslo"),
            ..Link::default()
        };
        assert_eq!(oslo.next_day_ms(1_729_944_000_000), 1_729_980_000_000);
        assert_eq!(oslo.next_day_ms(1_730_030_400_000), 1_730_070_000_000);
        // A zone is written and read by its name; an unknown one says what to write.
        let text = toml::to_string(&oslo).unwrap();
        assert_eq!(text.trim(), r#"zone = "Europe/Oslo""#);
        assert_eq!(toml::from_str::<Link>(&text).unwrap(), oslo);
        let err = toml::from_str::<Link>(r#"zone = "Mars/Olympus""#).unwrap_err();
        assert!(err.to_string().contains("unknown time zone"), "{err}");
    }
}
