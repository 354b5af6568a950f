//! The server's public base URL, for links in answers (manifest and heartbeat download URLs, the installer's default
//! server). In order:
//!
//! 1. the configured `--public-url`;
//! 2. from a peer in `--trusted-proxies`: the scheme and host it forwards (`Forwarded: proto=…;host=…`, else
//!    `X-Forwarded-Proto` / `X-Forwarded-Host`, else the `Host` header);
//! 3. a request that carries forwarding headers from any other peer came through a proxy nobody declared: its scheme
//!    is unknown, so there is no base URL (links become relative and the installer asks for `--server`), and a
//!    warning says which flag to set;
//! 4. otherwise the connection reached this server directly: `https://<Host>` when it speaks TLS itself,
//!    `http://<Host>` when not.
//!
//! Whatever this returns contains only URL-safe characters, so it can be placed into scripts without quoting
//! surprises.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{ConnectInfo, FromRequestParts};
use http::HeaderMap;
use http::request::Parts;
use http::uri::{Authority, Scheme, Uri};
use ipnet::IpNet;

use crate::AppState;

/// A validated `http(s)://host[:port][/path]` without trailing slash, query, fragment or user info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicUrl(String);

impl PublicUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part (without port or brackets), e.g. for the names of a generated certificate.
    pub fn host(&self) -> Option<&str> {
        let rest = self.0.split_once("://")?.1;
        let authority = rest.split('/').next()?;
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next()?,
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        (!host.is_empty()).then_some(host)
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

/// Proxies whose forwarding headers are believed (`--trusted-proxies`: IP addresses or CIDR ranges).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl FromStr for TrustedProxies {
    type Err = String;

    /// A comma-separated list of addresses (`10.0.0.5`) and ranges (`10.0.0.0/8`, `fd00::/8`); empty means none.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{item:?} is not an IP address or CIDR range"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

fn plain_host(host: &str) -> Option<&str> {
    let valid = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        && host.parse::<Authority>().is_ok();
    valid.then_some(host)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// `proto` and `host` of the last element of an RFC 7239 `Forwarded` header: the one the nearest proxy (the trusted
/// peer) appended. Earlier elements come from further away, the first possibly from the client itself.
fn forwarded(headers: &HeaderMap) -> (Option<String>, Option<String>) {
    let values: Vec<&str> = headers.get_all("forwarded").iter().filter_map(|v| v.to_str().ok()).collect();
    let Some(last) = values.last().and_then(|v| v.rsplit(',').next()) else { return (None, None) };
    let (mut proto, mut host) = (None, None);
    for pair in last.split(';') {
        let Some((key, value)) = pair.split_once('=') else { continue };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim().to_ascii_lowercase().as_str() {
            "proto" => proto = Some(value),
            "host" => host = Some(value),
            _ => {}
        }
    }
    (proto, host)
}

/// The last value of a comma-separated `X-Forwarded-*` header (the nearest proxy's).
fn last_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let value = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).next_back()?;
    value.rsplit(',').next().map(str::trim).filter(|v| !v.is_empty())
}

const FORWARDING_HEADERS: [&str; 4] = ["forwarded", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-ssl"];

/// The base URL for links in responses (see the module docs), or `None`: callers then emit paths relative to the
/// server root and leave the installer's default server unset.
pub fn base_url(
    configured: Option<&PublicUrl>,
    trusted: &TrustedProxies,
    own_scheme: &str,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
) -> Option<String> {
    if let Some(url) = configured {
        return Some(url.0.clone());
    }
    let host_header = header(headers, http::header::HOST.as_str());
    if peer.is_some_and(|ip| trusted.contains(ip)) {
        // Proxies commonly set X-Forwarded-* and pass a client's `Forwarded` through untouched, so X-Forwarded-*
        // comes first, and of either only what the nearest proxy added.
        let (fwd_proto, fwd_host) = forwarded(headers);
        let proto = last_value(headers, "x-forwarded-proto").map(str::to_owned).or(fwd_proto)?;
        let scheme = match proto.to_ascii_lowercase().as_str() {
            "https" => "https",
            "http" => "http",
            _ => return None,
        };
        let host = last_value(headers, "x-forwarded-host").map(str::to_owned).or(fwd_host);
        let host = plain_host(host.as_deref().or(host_header)?)?;
        return Some(format!("{scheme}://{host}"));
    }
    if FORWARDING_HEADERS.iter().any(|name| headers.contains_key(*name)) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
                "a request came through a proxy that is not in --trusted-proxies; its scheme is unknown, so links \
                 are relative and the installer asks for --server. Set --public-url (RM_PUBLIC_URL) or \
                 --trusted-proxies (RM_TRUSTED_PROXIES)"
            );
        }
        return None;
    }
    plain_host(host_header?).map(|host| format!("{own_scheme}://{host}"))
}

/// Whether a request reached the client's side over an encrypted or local channel, so secrets may go in the answer:
/// the connection speaks TLS; or it comes from a `--trusted-proxies` peer whose forwarded scheme (`X-Forwarded-Proto`,
/// else `Forwarded: proto=`) is https; or it comes from a loopback peer that forwards nothing (a loopback peer that
/// sends forwarding headers is a proxy, and the client behind it is not local).
pub fn secure_transport(tls: bool, peer: Option<IpAddr>, trusted: &TrustedProxies, headers: &HeaderMap) -> bool {
    if tls {
        return true;
    }
    let Some(ip) = peer.map(|ip| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }) else {
        return false;
    };
    if trusted.contains(ip) {
        // A trusted proxy vouches through whichever header it writes; a client may have sent the other one, which
        // the proxy passed through. Both must say https when both are present.
        let x_proto = last_value(headers, "x-forwarded-proto").map(str::to_owned);
        let rfc_proto = forwarded(headers).0;
        if x_proto.is_some() || rfc_proto.is_some() {
            return [x_proto, rfc_proto].iter().flatten().all(|p| p.eq_ignore_ascii_case("https"));
        }
    }
    // A loopback peer is this machine, unless it relays someone else: any sign of a proxy (a local nginx without
    // `proxy_set_header`, say, still adds X-Forwarded-For or X-Real-IP) means the client is elsewhere.
    ip.is_loopback() && !FORWARDING_HEADERS.iter().chain(RELAY_HEADERS.iter()).any(|name| headers.contains_key(*name))
}

/// Headers that show a request was relayed, beyond the ones that carry a scheme.
const RELAY_HEADERS: [&str; 5] = ["x-forwarded-for", "x-real-ip", "via", "x-forwarded-port", "x-forwarded-server"];

/// The base URL of this request (see [`base_url`]), as a handler argument.
pub struct BaseUrl(pub Option<String>);

impl BaseUrl {
    /// The base, or empty for links relative to the server root.
    pub fn or_relative(self) -> String {
        self.0.unwrap_or_default()
    }
}

impl FromRequestParts<AppState> for BaseUrl {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
        let scheme = if state.tls().is_some() { "https" } else { "http" };
        Ok(BaseUrl(base_url(state.public_url(), &state.settings().trusted_proxies, scheme, peer, &parts.headers)))
    }
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
    fn secrets_need_tls_loopback_or_a_trusted_https_proxy() {
        let trusted: TrustedProxies = "10.0.0.5".parse().unwrap();
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            m
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let none = h(&[]);
        assert!(secure_transport(true, ip("192.0.2.9"), &trusted, &none));
        assert!(secure_transport(false, ip("127.0.0.1"), &trusted, &none));
        assert!(secure_transport(false, ip("::1"), &trusted, &none));
        assert!(secure_transport(false, ip("::ffff:127.0.0.1"), &trusted, &none));
        assert!(!secure_transport(false, ip("192.0.2.9"), &trusted, &none));
        assert!(!secure_transport(false, None, &trusted, &none));
        // A client's own claim counts for nothing; a loopback proxy that is not trusted is not local.
        assert!(!secure_transport(false, ip("192.0.2.9"), &trusted, &h(&[("x-forwarded-proto", "https")])));
        assert!(!secure_transport(false, ip("127.0.0.1"), &trusted, &h(&[("x-forwarded-proto", "https")])));
        // A local relay that sets no scheme header (nginx without proxy_set_header) still shows it relays.
        for relay in ["x-forwarded-for", "x-real-ip", "via"] {
            assert!(!secure_transport(false, ip("127.0.0.1"), &trusted, &h(&[(relay, "192.0.2.9")])), "{relay}");
        }
        // The trusted proxy's word: https yes, http no; both headers, when both are present (the proxy may have
        // passed a client's own through).
        assert!(secure_transport(false, ip("10.0.0.5"), &trusted, &h(&[("x-forwarded-proto", "https")])));
        assert!(secure_transport(false, ip("10.0.0.5"), &trusted, &h(&[("forwarded", "for=1.2.3.4;proto=https")])));
        assert!(!secure_transport(false, ip("10.0.0.5"), &trusted, &h(&[("x-forwarded-proto", "http")])));
        assert!(!secure_transport(
            false,
            ip("10.0.0.5"),
            &trusted,
            &h(&[("x-forwarded-proto", "http"), ("forwarded", "proto=https")])
        ));
        assert!(!secure_transport(
            false,
            ip("10.0.0.5"),
            &trusted,
            &h(&[("x-forwarded-proto", "https"), ("forwarded", "for=1.2.3.4;proto=http")])
        ));
        assert!(!secure_transport(false, ip("10.0.0.5"), &trusted, &none));
    }

    #[test]
    fn host_header_is_used_only_when_plain() {
        let with_host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::HOST, h.parse().unwrap());
            base_url(None, &TrustedProxies::default(), "http", None, &m)
        };
        assert_eq!(with_host("example.com:8080").as_deref(), Some("http://example.com:8080"));
        assert_eq!(with_host("[::1]:8080").as_deref(), Some("http://[::1]:8080"));
        for hostile in ["evil.com/x", "a;b", "$(id)", "a`b`", "x\"y", "a b", "u@h", "h?q"] {
            assert_eq!(with_host(hostile), None, "{hostile:?}");
        }
        let configured: PublicUrl = "https://fixed.example".parse().unwrap();
        let mut m = HeaderMap::new();
        m.insert(http::header::HOST, "evil.com".parse().unwrap());
        assert_eq!(
            base_url(Some(&configured), &TrustedProxies::default(), "http", None, &m).as_deref(),
            Some("https://fixed.example")
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.parse::<http::HeaderName>().unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn forwarded_scheme_is_believed_only_from_trusted_proxies() {
        let trusted: TrustedProxies = "10.0.0.0/8, 127.0.0.1".parse().unwrap();
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "192.0.2.9".parse().unwrap();
        let tls = headers(&[
            ("host", "rm.internal:8080"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "rm.example.com"),
        ]);
        assert_eq!(base_url(None, &trusted, "http", Some(proxy), &tls).as_deref(), Some("https://rm.example.com"));
        let rfc = headers(&[
            ("host", "rm.internal"),
            // The nearest proxy's element is the last one; the first may be the client's own.
            (
                "forwarded",
                "for=192.0.2.1;proto=http;host=evil.example, for=192.0.2.1;proto=https;host=\"rm.example.com:8443\"",
            ),
        ]);
        assert_eq!(base_url(None, &trusted, "http", Some(proxy), &rfc).as_deref(), Some("https://rm.example.com:8443"));
        // A client's own Forwarded header passed through by a proxy that sets X-Forwarded-*: the proxy's wins.
        let spoofed = headers(&[
            ("host", "rm.internal"),
            ("forwarded", "proto=http;host=evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "rm.example.com"),
        ]);
        assert_eq!(base_url(None, &trusted, "http", Some(proxy), &spoofed).as_deref(), Some("https://rm.example.com"));
        let chained = headers(&[("host", "rm.internal"), ("x-forwarded-proto", "http, https")]);
        assert_eq!(base_url(None, &trusted, "http", Some(proxy), &chained).as_deref(), Some("https://rm.internal"));
        // IPv4-mapped IPv6 peers match IPv4 ranges.
        let mapped: IpAddr = "::ffff:10.9.9.9".parse().unwrap();
        assert_eq!(base_url(None, &trusted, "http", Some(mapped), &tls).as_deref(), Some("https://rm.example.com"));
        // The same headers from anyone else: no base URL at all (never a guessed http:// link).
        assert_eq!(base_url(None, &trusted, "http", Some(stranger), &tls), None);
        assert_eq!(base_url(None, &TrustedProxies::default(), "http", Some(proxy), &tls), None);
        // A trusted proxy that does not say which scheme, or says something else, or forwards a hostile host.
        for bad in [
            headers(&[("host", "rm.internal")]),
            headers(&[("host", "rm.internal"), ("x-forwarded-proto", "gopher")]),
            headers(&[("host", "rm.internal"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "a.b/$(id)")]),
        ] {
            assert_eq!(base_url(None, &trusted, "http", Some(proxy), &bad), None, "{bad:?}");
        }
        // Direct connection without forwarding headers: this server's own scheme.
        let direct = headers(&[("host", "rm.internal:8080")]);
        assert_eq!(
            base_url(None, &trusted, "http", Some(stranger), &direct).as_deref(),
            Some("http://rm.internal:8080")
        );
        assert_eq!(
            base_url(None, &trusted, "https", Some(stranger), &direct).as_deref(),
            Some("https://rm.internal:8080")
        );
    }

    #[test]
    fn trusted_proxy_lists_parse_or_fail_clearly() {
        assert_eq!("".parse::<TrustedProxies>().unwrap(), TrustedProxies::default());
        assert!("10.0.0.1, fd00::/8 ,192.168.0.0/16".parse::<TrustedProxies>().is_ok());
        let err = "10.0.0.1,proxy.example".parse::<TrustedProxies>().unwrap_err();
        assert!(err.contains("proxy.example"), "{err}");
    }
}
