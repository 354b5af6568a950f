//! The server's public base URL: configured (`RM_PUBLIC_URL`) or, failing that, derived from a strictly validated
//! `Host` header. Whatever this returns contains only URL-safe characters, so later issues can place it into scripts
//! without any quoting surprises.

use std::fmt;
use std::str::FromStr;

use http::HeaderMap;
use http::uri::{Authority, Scheme, Uri};

/// A validated `http(s)://host[:port][/path]` without trailing slash, query, fragment or user info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicUrl(String);

impl PublicUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn url_safe(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~/:[]%".contains(&b))
}

impl FromStr for PublicUrl {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let uri: Uri = raw.parse().map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
        let scheme = uri.scheme().ok_or_else(|| format!("{raw:?} needs a scheme (http:// or https://)"))?;
        if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
            return Err(format!("{raw:?}: only http and https are supported"));
        }
        let authority = uri.authority().ok_or_else(|| format!("{raw:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{raw:?}: user info is not allowed in the public URL"));
        }
        if uri.query().is_some() || raw.contains('#') {
            return Err(format!("{raw:?}: a query or fragment is not allowed in the public URL"));
        }
        let path = uri.path().trim_end_matches('/');
        let url = format!("{scheme}://{authority}{path}");
        if !url_safe(&url) {
            return Err(format!("{raw:?} contains characters that are not allowed"));
        }
        Ok(PublicUrl(url))
    }
}

/// The base URL for links in responses: the configured one, else `http://<Host>` when the Host header is a plain
/// host[:port], else `None` (callers then emit paths relative to the server root).
pub fn base_url(configured: Option<&PublicUrl>, headers: &HeaderMap) -> Option<String> {
    if let Some(url) = configured {
        return Some(url.0.clone());
    }
    let host = headers.get(http::header::HOST)?.to_str().ok()?;
    let valid = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        && host.parse::<Authority>().is_ok();
    valid.then(|| format!("http://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_urls_are_normalised_or_refused() {
        assert_eq!("https://rm.example.com/".parse::<PublicUrl>().unwrap().as_str(), "https://rm.example.com");
        assert_eq!("http://10.0.0.1:8080/rm//".parse::<PublicUrl>().unwrap().as_str(), "http://10.0.0.1:8080/rm");
        for bad in [
            "rm.example.com",
            "ftp://x",
            "https://u:p@x",
            "https://x/?a=b",
            "https://x/#f",
            "https://x/$(id)",
            "https://x/a'b",
            "https://x/a\"b",
            "",
        ] {
            assert!(bad.parse::<PublicUrl>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn host_header_is_used_only_when_plain() {
        let with_host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::HOST, h.parse().unwrap());
            base_url(None, &m)
        };
        assert_eq!(with_host("example.com:8080").as_deref(), Some("http://example.com:8080"));
        assert_eq!(with_host("[::1]:8080").as_deref(), Some("http://[::1]:8080"));
        for hostile in ["evil.com/x", "a;b", "$(id)", "a`b`", "x\"y", "a b", "u@h", "h?q"] {
            assert_eq!(with_host(hostile), None, "{hostile:?}");
        }
        let configured: PublicUrl = "https://fixed.example".parse().unwrap();
        let mut m = HeaderMap::new();
        m.insert(http::header::HOST, "evil.com".parse().unwrap());
        assert_eq!(base_url(Some(&configured), &m).as_deref(), Some("https://fixed.example"));
    }
}
