//! Validators both ends apply to the same fields, so an agent never sends what the server would refuse.

/// Longest host name accepted (DNS limit).
pub const MAX_HOSTNAME_LEN: usize = 253;

/// A host name as the server stores it: 1..=253 bytes of `[A-Za-z0-9._-]`.
pub fn is_hostname(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_HOSTNAME_LEN && value.bytes().all(is_hostname_byte)
}

fn is_hostname_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// Reduces whatever the operating system reports to a name [`is_hostname`] accepts: other characters become `-`,
/// the result is cut to the limit, and an empty name becomes `unknown`.
pub fn sanitize_hostname(raw: &str) -> String {
    let clean: String = raw
        .chars()
        .map(|c| if c.is_ascii() && is_hostname_byte(c as u8) { c } else { '-' })
        .take(MAX_HOSTNAME_LEN)
        .collect();
    if clean.is_empty() { "unknown".into() } else { clean }
}

/// Exactly 64 hex digits (either case).
pub fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// 1..=`max` bytes without control characters.
pub fn is_printable(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && !value.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for good in ["web-1", "a", "db.example.com", "HOST_2", &"x".repeat(253)] {
            assert!(is_hostname(good), "{good:?}");
        }
        for bad in ["", "a b", "é", "a/b", "../x", "a\nb", &"x".repeat(254)] {
            assert!(!is_hostname(bad), "{bad:?}");
        }
    }

    #[test]
    fn sanitized_names_are_always_accepted() {
        for raw in ["", "web 1", "héllo", "a/b\\c", "\u{202e}evil", &"é".repeat(300), "ok.host"] {
            let clean = sanitize_hostname(raw);
            assert!(is_hostname(&clean), "{raw:?} -> {clean:?}");
        }
        assert_eq!(sanitize_hostname("web 1"), "web-1");
        assert_eq!(sanitize_hostname(""), "unknown");
    }

    #[test]
    fn sha256_hex() {
        assert!(is_sha256_hex(&"aB".repeat(32)));
        assert!(!is_sha256_hex(&"a".repeat(63)));
        assert!(!is_sha256_hex(&"g".repeat(64)));
    }

    #[test]
    fn printable() {
        assert!(is_printable("1.2.3", 128));
        assert!(!is_printable("", 128));
        assert!(!is_printable("a\u{1b}[31m", 128));
        assert!(!is_printable("abc", 2));
    }
}
