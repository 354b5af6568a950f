//! Agent labels (`env=prod`): what enrollment tokens give the agents they enroll, what the admin API sets, and what
//! plan selectors match. Stored as a JSON object in `enrollment_tokens.labels` and `agents.labels`.

use std::collections::BTreeMap;

use rm_protocol::validate::is_unsafe_char;

/// Most labels one agent, token or selector may have.
pub const MAX_LABELS: usize = 64;
/// Longest label key (`[a-z0-9][a-z0-9._/-]{0,62}`).
pub const MAX_KEY: usize = 63;
/// Longest label value, in characters.
pub const MAX_VALUE: usize = 200;

pub type Labels = BTreeMap<String, String>;

/// A label key: `[a-z0-9][a-z0-9._/-]{0,62}`.
pub fn validate_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'.' | b'_' | b'/' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label key {:?} must be 1-{MAX_KEY} characters of a-z, 0-9, '.', '_', '/', '-', starting with a letter or \
             digit",
            shown(key)
        ))
    }
}

/// A label value: at most 200 characters, no control or bidirectional characters (may be empty).
pub fn validate_value(key: &str, value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_VALUE || value.chars().any(is_unsafe_char) {
        return Err(format!("label {key}: the value must be at most {MAX_VALUE} printable characters"));
    }
    Ok(())
}

/// Checks a whole label set; `field` names it in the error (`labels`, `selector`).
pub fn validate_labels(field: &str, labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{field}: at most {MAX_LABELS} labels"));
    }
    for (key, value) in labels {
        validate_key(key).map_err(|e| format!("{field}: {e}"))?;
        validate_value(key, value).map_err(|e| format!("{field}: {e}"))?;
    }
    Ok(())
}

/// Parses `key=value` (command line `--label`, `--selector`, `agents label`).
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("{:?} is not key=value", shown(text)));
    };
    validate_key(key)?;
    validate_value(key, value)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// The stored form.
pub(crate) fn to_json(labels: &Labels) -> String {
    serde_json::to_string(labels).expect("a string map serialises")
}

/// Reads the stored form; a damaged value reads as no labels rather than failing every listing.
pub(crate) fn from_json(text: &str) -> Labels {
    serde_json::from_str(text).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a stored label set does not parse; treating it as empty");
        Labels::new()
    })
}

/// `k=v,k2=v2` for audit details and listings.
pub fn describe(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_follow_the_label_rules() {
        for good in ["env", "0", "team.io/owner", "a-b_c", &"k".repeat(63)] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in ["", "Env", "-a", "/a", "a b", "a=b", "é", &"k".repeat(64)] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
        assert!(validate_value("k", "").is_ok() && validate_value("k", "Prod Zone ü").is_ok());
        assert!(validate_value("k", &"v".repeat(201)).is_err());
        assert!(validate_value("k", "a\nb").is_err() && validate_value("k", "a\u{202e}b").is_err());
        let many: Labels = (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels("labels", &many).unwrap_err().starts_with("labels:"));
        assert_eq!(parse_pair("env=prod=1").unwrap(), ("env".into(), "prod=1".into()));
        assert!(parse_pair("env").is_err() && parse_pair("=x").is_err());
    }
}
