//! The exact commands that install the agent on a host from this server, as `token create` prints them and the web
//! page shows them. The URL is a validated public URL or a checked Host; the token is base64url: nothing in a line
//! needs quoting, and [`linux`] refuses to build one from anything else.

/// `curl … | sh` for a Linux host (as root), with the certificate's key pin when it is self-signed.
pub fn linux(url: &str, token: &str, pin: Option<&str>) -> String {
    let (curl_pin, script_pin) = match pin {
        Some(pin) => (format!(" --pinnedpubkey {pin} -k"), format!(" --pin {pin}")),
        None => (String::new(), String::new()),
    };
    format!("curl -fsSL{curl_pin} {url}/install/install.sh | RM_ENROLL_TOKEN={token} sh -s --{script_pin}")
}

/// The elevated PowerShell line for a Windows host.
pub fn windows(url: &str, token: &str) -> String {
    format!("& ([scriptblock]::Create((iwr -UseBasicParsing {url}/install/install.ps1).Content)) -Token {token}")
}

/// Whether every character of `word` is one a shell and PowerShell take literally in these lines (the URL, the
/// token and the pin): letters, digits and `-._~:/[]=+@%`.
pub fn is_shell_safe(word: &str) -> bool {
    !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-._~:/[]=+@%".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_server_token_and_pin() {
        assert_eq!(
            linux("https://rm.example:8443", "rmenr_abc", Some("sha256//K3y=")),
            "curl -fsSL --pinnedpubkey sha256//K3y= -k https://rm.example:8443/install/install.sh | \
             RM_ENROLL_TOKEN=rmenr_abc sh -s -- --pin sha256//K3y="
        );
        assert_eq!(
            linux("http://10.0.0.1:8080", "rmenr_abc", None),
            "curl -fsSL http://10.0.0.1:8080/install/install.sh | RM_ENROLL_TOKEN=rmenr_abc sh -s --"
        );
        assert!(windows("https://[::1]:8080", "rmenr_x").contains("iwr -UseBasicParsing https://[::1]:8080/install"));
    }

    #[test]
    fn shell_safety() {
        for ok in ["https://rm.example:8443", "http://[::1]:80", "rmenr_Ab-9_x", "sha256//a+b/c="] {
            assert!(is_shell_safe(ok), "{ok}");
        }
        for bad in ["", "a b", "x;id", "$(id)", "`id`", "a'b", "a\"b", "a|b", "a&b", "a\nb", "<b>", "a\\b"] {
            assert!(!is_shell_safe(bad), "{bad:?}");
        }
    }
}
