//! The allowlist for file names taken from a request path.
//!
//! A name is one path component made of ASCII letters, digits, `.`, `_` and `-`, not starting with `.`, at most
//! [`MAX_NAME_LEN`] bytes. That rules out `..`, separators of every platform, NUL, control characters, percent
//! sequences that survived one decoding pass, and hidden files, without enumerating the bad cases.

pub const MAX_NAME_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("file name is empty")]
    Empty,
    #[error("file name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("file name must not start with '.'")]
    LeadingDot,
    #[error("file name may contain only ASCII letters, digits, '.', '_' and '-'")]
    BadCharacter,
}

/// Checks an already percent-decoded name.
pub fn validate_name(name: &str) -> Result<&str, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(NameError::BadCharacter);
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_pass() {
        for n in ["install.sh", "install.ps1", "restic-manager-agent.service", "a", "v1.2.3_notes-x"] {
            assert_eq!(validate_name(n), Ok(n));
        }
    }

    #[test]
    fn hostile_names_fail() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for n in [
            "",
            ".",
            "..",
            ".hidden",
            "../etc/passwd",
            "a/b",
            "a\\b",
            "/etc/passwd",
            "C:\\x",
            "a\0b",
            "%2e%2e",
            "a b",
            "a\nb",
            "é",
            long.as_str(),
            "a:b",
            "*",
        ] {
            assert!(validate_name(n).is_err(), "{n:?} accepted");
        }
    }
}
