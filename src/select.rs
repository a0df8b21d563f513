//! Picking exchanges (and a replay's results) by status and endpoint class, for `inspect` and
//! `export`: on a results tape the status is the live one, so `--status 5xx` lists what the
//! target failed and `--endpoint index_report` one class's requests.

use std::str::FromStr;

use crate::endpoint;
use crate::tape::{Exchange, Outcome, Record};

/// A status to match: `404`, a class `5xx`, or `error` (no response from upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPattern {
    Exact(u16),
    Class(u8),
    Error,
}

impl FromStr for StatusPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a status: use a code (404), a class (5xx) or `error`");
        let lower = s.to_ascii_lowercase();
        if lower == "error" {
            return Ok(StatusPattern::Error);
        }
        if let Some(class) = lower.strip_suffix("xx") {
            return match class.parse::<u8>() {
                Ok(c @ 1..=5) => Ok(StatusPattern::Class(c)),
                _ => Err(bad()),
            };
        }
        match lower.parse::<u16>() {
            Ok(code @ 100..=599) => Ok(StatusPattern::Exact(code)),
            _ => Err(bad()),
        }
    }
}

impl StatusPattern {
    pub fn matches(&self, e: &Exchange) -> bool {
        self.matches_status(e.response.as_ref().ok().map(|r| r.status))
    }

    /// `None`: no response.
    fn matches_status(&self, status: Option<u16>) -> bool {
        match (self, status) {
            (StatusPattern::Error, s) => s.is_none(),
            (StatusPattern::Exact(code), Some(s)) => s == *code,
            (StatusPattern::Class(c), Some(s)) => s / 100 == *c as u16,
            (_, None) => false,
        }
    }
}

/// Which records a command looks at. Records other than exchanges always pass.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Any of these statuses (all when empty).
    pub statuses: Vec<StatusPattern>,
    /// Endpoint classes containing this text (e.g. `blobs/{digest}` or `index_report`).
    pub endpoint: Option<String>,
}

impl Selection {
    pub fn is_all(&self) -> bool {
        self.statuses.is_empty() && self.endpoint.is_none()
    }

    pub fn matches(&self, record: &Record) -> bool {
        let (status, class) = match record {
            Record::Exchange(e) => (
                e.response.as_ref().ok().map(|r| r.status),
                std::borrow::Cow::Owned(endpoint::template(
                    e.request.method.as_str(),
                    &e.request.target,
                )),
            ),
            Record::Replayed(r) => (
                match r.outcome {
                    Outcome::Status(s) => Some(s),
                    Outcome::Failed(_) | Outcome::Skipped => None,
                },
                std::borrow::Cow::Borrowed(r.endpoint.as_str()),
            ),
            _ => return true,
        };
        if !self.statuses.is_empty() && !self.statuses.iter().any(|s| s.matches_status(status)) {
            return false;
        }
        match &self.endpoint {
            Some(want) => class.contains(want.as_str()),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_patterns_parse_or_say_what_is_right() {
        assert_eq!("404".parse(), Ok(StatusPattern::Exact(404)));
        assert_eq!("5xx".parse(), Ok(StatusPattern::Class(5)));
        assert_eq!("ERROR".parse(), Ok(StatusPattern::Error));
        let err = "9xx".parse::<StatusPattern>().unwrap_err();
        assert!(
            err.contains("use a code (404), a class (5xx) or `error`"),
            "{err}"
        );
        assert!("42".parse::<StatusPattern>().is_err());
    }
}
