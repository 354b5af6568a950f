//! What the repository and plan forms share: turning text fields into the API's lists and maps (the checks stay in
//! `rm_fleet`), and telling an error the operator can fix in the form from one that ends the page.

use std::collections::BTreeMap;

use http::StatusCode;

use super::PageError;
use crate::ApiError;

/// One entry a line (paths, excludes, PEM lines aside): trimmed, blank lines dropped.
pub(crate) fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// Entries separated by commas or white space (tags, agent ids).
pub(crate) fn words(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

/// `key=value` pairs separated by commas or new lines, each checked as a label (`rm_fleet::labels::parse_pair`);
/// the error names `field`.
pub(crate) fn pairs(field: &str, text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for pair in text.split([',', '\n']).map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => rm_fleet::labels::parse_pair(&format!("{}={}", k.trim(), v.trim())),
            None => rm_fleet::labels::parse_pair(pair),
        }
        .map_err(|e| format!("{field}: {e}"))?;
        if map.insert(key.clone(), value).is_some() {
            return Err(format!("{field}: {key:?} is given twice"));
        }
    }
    Ok(map)
}

/// `key=value, …` for a form field.
pub(crate) fn pairs_text(map: &BTreeMap<String, String>) -> String {
    map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// An optional whole number: empty is `None`.
pub(crate) fn count(field: &str, text: &str) -> Result<Option<u32>, String> {
    match text.trim() {
        "" => Ok(None),
        t => t.parse().map(Some).map_err(|_| format!("{field}: {t:?} is not a whole number")),
    }
}

/// An optional text field: empty (after trimming) is `None`.
pub(crate) fn optional(text: &str) -> Option<String> {
    Some(text.trim().to_owned()).filter(|t| !t.is_empty())
}

/// A checkbox: present when ticked.
pub(crate) fn ticked(value: &Option<String>) -> bool {
    value.is_some()
}

/// `86400` → `1d`, `5400` → `90m`, `45` → `45s`: a duration the plan checks read back.
pub(crate) fn duration_text(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The status and message of an error the operator can fix by changing the form (invalid input, a name that is
/// taken, a repository in use); any other error ends the page.
pub(crate) fn fixable(e: ApiError) -> Result<(StatusCode, String), PageError> {
    let (status, body) = e.status_and_body();
    if matches!(status, StatusCode::BAD_REQUEST | StatusCode::CONFLICT) {
        Ok((status, body.message))
    } else {
        Err(PageError(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_words() {
        assert_eq!(lines(" /srv \r\n\r\n/etc\n  \nC:\\Users"), ["/srv", "/etc", "C:\\Users"]);
        assert!(lines("  \n").is_empty());
        assert_eq!(words("a, b  c,,d\ne"), ["a", "b", "c", "d", "e"]);
        assert!(words(" , ").is_empty());
    }

    #[test]
    fn pairs_are_key_value_labels() {
        let map = pairs("selector", "env = prod, site=a\nrole=db").unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map["env"], "prod");
        assert_eq!(pairs_text(&map), "env=prod, role=db, site=a");
        assert!(pairs("selector", "").unwrap().is_empty());
        assert!(pairs("selector", "novalue").unwrap_err().starts_with("selector:"));
        assert!(pairs("selector", "a=1, a=2").unwrap_err().contains("twice"));
        assert!(pairs("selector", "<b>=x").unwrap_err().starts_with("selector:"));
    }

    #[test]
    fn counts_and_durations() {
        assert_eq!(count("retention.daily", " 7 "), Ok(Some(7)));
        assert_eq!(count("retention.daily", ""), Ok(None));
        assert!(count("retention.daily", "seven").unwrap_err().starts_with("retention.daily:"));
        assert_eq!(duration_text(86_400), "1d");
        assert_eq!(duration_text(7200), "2h");
        assert_eq!(duration_text(5400), "90m");
        assert_eq!(duration_text(45), "45s");
        assert_eq!(duration_text(0), "0s");
        for secs in [0, 45, 5400, 7200, 86_400, 90_061] {
            let back = rm_protocol::schedule::parse_duration(&duration_text(secs));
            assert!(secs == 0 || back == Ok(std::time::Duration::from_secs(secs)), "{secs}");
        }
    }

    #[test]
    fn only_input_errors_stay_in_the_form() {
        let Ok(bad) = fixable(ApiError::InvalidRequest("x".into())) else { panic!("a 400 stays in the form") };
        assert_eq!(bad, (StatusCode::BAD_REQUEST, "x".into()));
        let Ok(taken) = fixable(ApiError::Conflict("taken".into())) else { panic!("a 409 stays in the form") };
        assert_eq!(taken.0, StatusCode::CONFLICT);
        assert!(fixable(ApiError::NotFound("plan".into())).is_err());
    }
}
