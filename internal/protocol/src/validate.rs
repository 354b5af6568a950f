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

/// Characters that must never be stored or shown as sent: control characters (ANSI escapes, CR/LF, NUL) and the
/// Unicode bidirectional controls that reorder what a terminal or page displays (U+061C, U+200E/F,
/// U+202A–U+202E, U+2066–U+2069).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// 1..=`max` bytes without [unsafe characters](is_unsafe_char).
pub fn is_printable(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && !value.chars().any(is_unsafe_char)
}

/// The name an operator gives a repository, plan, notification channel or rule: 1-63 characters of a-z, 0-9, `.`,
/// `_`, `-`, starting with a letter or digit (safe in a path, a URL segment, a log line and a shell word). `field`
/// names it in the error.
pub fn name(field: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'.' | b'_' | b'-')));
    if ok {
        Ok(())
    } else {
        Err(format!("{field} must be 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"))
    }
}

/// Free text from a peer (an error message, a user agent), made safe to store and show: every
/// [unsafe character](is_unsafe_char) becomes a space, and the result is cut to `max` characters.
pub fn clean_text(value: &str, max: usize) -> String {
    value.chars().take(max).map(|c| if is_unsafe_char(c) { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "0", "prod-db.v2_x", &"a".repeat(63)] {
            assert_eq!(name("name", good), Ok(()), "{good}");
        }
        for bad in ["", "-a", ".a", "_a", "A", "a b", "a/b", &"a".repeat(64), "é", "a\n"] {
            let err = name("channel", bad).unwrap_err();
            assert!(err.starts_with("channel must be 1-63 characters"), "{bad}: {err}");
        }
    }

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
    fn unsafe_characters_are_refused_or_replaced() {
        for hostile in ["a\u{1b}[31mred", "line\r\nInjected: 1", "nul\0", "\u{202e}txt.exe", "a\u{2066}b", "\u{200f}x"]
        {
            assert!(!is_printable(hostile, 128), "{hostile:?}");
            let clean = clean_text(hostile, 128);
            assert!(is_printable(clean.trim(), 128) || clean.trim().is_empty(), "{hostile:?} -> {clean:?}");
            assert_eq!(clean.chars().count(), hostile.chars().count());
        }
        assert_eq!(clean_text("héllo wörld", 5), "héllo");
    }

    #[test]
    fn printable() {
        assert!(is_printable("1.2.3", 128));
        assert!(!is_printable("", 128));
        assert!(!is_printable("a\u{1b}[31m", 128));
        assert!(!is_printable("abc", 2));
    }
}
