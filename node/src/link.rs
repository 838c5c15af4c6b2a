//! What the operator lets a link carry to one peer: sync windows (UTC), a byte budget per UTC
//! day and a rate, decided here from the time and the day's meter handed in.
//!
//! The gate is checked before each batch and each file segment served. When a window closes
//! the batches in flight finish and no new one starts; when the day's budget is spent nothing
//! more goes until the next UTC day; the rate spaces batches so that on average no more than
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

/// A daily sync window, `HH:MM-HH:MM` in UTC; one that ends before it starts spans midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    /// Minutes after midnight UTC.
    pub start: u16,
    pub end: u16,
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Window, String> {
        let bad = || format!("window {s:?} is not HH:MM-HH:MM (UTC, 00:00 to 24:00)");
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
    /// Whether the window holds `minute` (after midnight UTC).
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
    /// Most bytes sent to the peer per UTC day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
}

/// Bytes sent to one peer on one UTC day (kept in the store, so a restart keeps counting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub bytes: u64,
}

/// Why nothing goes to a peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum HeldBack {
    /// Outside every window; the next opens at `opens_ms`.
    OutsideWindow { opens_ms: i64 },
    /// The day's budget is spent; it resets at `resets_ms` (midnight UTC).
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
    /// The meter as of `now_ms`: a new day starts at zero.
    pub fn on(self, now_ms: i64) -> Meter {
        let day = now_ms.div_euclid(DAY_MS);
        if day == self.day {
            self
        } else {
            Meter { day, bytes: 0 }
        }
    }
}

impl Link {
    /// Whether the link is shaped at all.
    pub fn is_open_always(&self) -> bool {
        self.max_rate.is_none() && self.windows.is_empty() && self.budget.is_none()
    }

    /// Why nothing may go now, if so: `meter` is the day's bytes so far, `next_ms` when the
    /// rate allows the next send.
    pub fn held_back(&self, meter: Meter, next_ms: i64, now_ms: i64) -> Option<HeldBack> {
        if !self.windows.is_empty() {
            let minute = (now_ms.rem_euclid(DAY_MS) / 60_000) as u16;
            if !self.windows.iter().any(|w| w.contains(minute)) {
                return Some(HeldBack::OutsideWindow {
                    opens_ms: self.next_open(now_ms),
                });
            }
        }
        if let Some(budget) = self.budget
            && meter.on(now_ms).bytes >= budget
        {
            return Some(HeldBack::BudgetSpent {
                resets_ms: (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS,
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
            if meter.on(now_ms).bytes.saturating_add(bytes) > share {
                return Some(HeldBack::BudgetSpent {
                    resets_ms: (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS,
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
        let day = now_ms.div_euclid(DAY_MS) * DAY_MS;
        let minute = now_ms.rem_euclid(DAY_MS) / 60_000;
        self.windows
            .iter()
            .map(|w| {
                let start = i64::from(w.start);
                if start > minute {
                    day + start * 60_000
                } else {
                    day + DAY_MS + start * 60_000
                }
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
}
