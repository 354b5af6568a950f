//! HTTP client for the server's agent API (ureq with rustls: a small static binary, no OpenSSL).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use rm_protocol::validate::sanitize_hostname;
use rm_protocol::{
    EnrollRequest, EnrollResponse, ErrorBody, HeartbeatRequest, HeartbeatResponse, HostFacts, Manifest, Platform,
    PlatformEntry,
};
use ureq::tls::{RootCerts, TlsConfig};

use crate::AgentError;

/// The platform this agent was built for; fails on one the server has no agent for.
pub fn host_platform() -> Result<Platform, AgentError> {
    Platform::host().ok_or_else(|| {
        AgentError::Usage(format!(
            "unsupported platform {}/{}; supported: {}",
            std::env::consts::OS,
            std::env::consts::ARCH,
            rm_protocol::platform::supported_list()
        ))
    })
}

/// This host and this binary, as sent on enrollment and with every heartbeat.
pub fn host_facts() -> Result<HostFacts, AgentError> {
    let platform = host_platform()?;
    let build = rm_buildinfo::current();
    Ok(HostFacts {
        hostname: sanitize_hostname(&gethostname::gethostname().to_string_lossy()),
        os: platform.os.as_str().into(),
        arch: platform.arch.as_str().into(),
        version: build.version,
        commit: build.commit,
    })
}

pub struct Client {
    http: ureq::Agent,
    base: String,
    origin: Origin,
}

/// Scheme, host and port of a URL: what a credential is bound to. Default ports are made explicit, so
/// `https://h` and `https://h:443` are one origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// The origin of an absolute `http://` or `https://` URL; `None` for anything else.
    pub fn of(url: &str) -> Option<Origin> {
        let uri: ureq::http::Uri = url.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let authority = uri.authority()?;
        if authority.as_str().contains('@') {
            return None; // user info in a link is never ours
        }
        let host = uri.host().filter(|h| !h.is_empty())?.to_ascii_lowercase();
        Some(Origin { scheme, host, port: uri.port_u16().unwrap_or(default_port) })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl Client {
    pub fn new(server: &str, cacert: Option<&Path>, insecure: bool) -> Result<Client, AgentError> {
        let base = server.trim_end_matches('/').to_string();
        let origin = Origin::of(&base)
            .ok_or_else(|| AgentError::Usage(format!("server URL must start with http:// or https://: {server}")))?;
        let mut tls = TlsConfig::builder().disable_verification(insecure);
        if let Some(path) = cacert {
            let pem = std::fs::read(path).map_err(AgentError::io(format!("reading CA bundle {}", path.display())))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(AgentError::Usage(format!("{} contains no PEM certificate", path.display())));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Enrolled over https: never talk plain http, not even through a redirect.
            .https_only(origin.scheme == "https")
            // The protocol never redirects, and a redirected request would lose its credential anyway.
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .user_agent(format!("restic-manager-agent/{}", rm_buildinfo::current().version))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Client { http, base, origin })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The absolute URL for a server path (`/…`), or an absolute URL the server sent if it is on the origin this
    /// agent enrolled with. Anything else is refused before any request is made: an `http://` link while enrolled
    /// over `https://` would be a downgrade, and a link to another origin would carry the agent's credential (or,
    /// without it, fetch a build from a host the agent never trusted). Refusing, rather than fetching without the
    /// credential, means nothing at all goes to a host the agent did not enroll with.
    pub fn url(&self, path_or_url: &str) -> Result<String, AgentError> {
        if path_or_url.starts_with('/') {
            return Ok(format!("{}{path_or_url}", self.base));
        }
        let shown = crate::printable(path_or_url);
        let Some(origin) = Origin::of(path_or_url) else {
            return Err(AgentError::Untrusted(format!("{shown} is neither a path nor an http(s) URL")));
        };
        if origin == self.origin {
            return Ok(path_or_url.to_string());
        }
        if self.origin.scheme == "https" && origin.scheme == "http" {
            return Err(AgentError::Untrusted(format!(
                "{shown} is plain http, but this agent enrolled over https ({}); not downgrading",
                self.base
            )));
        }
        Err(AgentError::Untrusted(format!(
            "{shown} is on {origin}, not on the server this agent enrolled with ({}); the credential goes only there \
             (set the server's public URL to the address agents use, or re-enroll with it)",
            self.origin
        )))
    }

    fn check(
        url: &str,
        response: ureq::http::Response<ureq::Body>,
    ) -> Result<ureq::http::Response<ureq::Body>, AgentError> {
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let mut response = response;
        let body: Option<ErrorBody> = response.body_mut().read_json().ok();
        // The server's words are shown to an operator: no escapes, line breaks or bidi controls get through.
        Err(match body {
            Some(b) => {
                AgentError::Server { status, code: crate::printable(&b.error), message: crate::printable(&b.message) }
            }
            None => AgentError::Server {
                status,
                code: "unknown".into(),
                message: format!("unexpected answer from {}", crate::printable(url)),
            },
        })
    }

    fn network(url: &str) -> impl FnOnce(ureq::Error) -> AgentError + '_ {
        move |e| AgentError::Network { url: crate::printable(url), reason: crate::printable(&e.to_string()) }
    }

    pub fn enroll(&self, token: &str, facts: HostFacts) -> Result<EnrollResponse, AgentError> {
        let url = self.url("/api/v1/agents/enroll")?;
        let response = self.http.post(&url).send_json(EnrollRequest::new(token, facts)).map_err(Self::network(&url))?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    pub fn heartbeat(&self, credential: &str, request: &HeartbeatRequest) -> Result<HeartbeatResponse, AgentError> {
        let url = self.url("/api/v1/agents/heartbeat")?;
        let response = self
            .http
            .post(&url)
            .header("authorization", format!("Bearer {credential}"))
            .send_json(request)
            .map_err(Self::network(&url))?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    /// The published manifest entry for one platform. The credential is sent because a server started with
    /// `--require-download-auth` answers 401 without it.
    pub fn served_build(&self, platform: Platform, credential: &str) -> Result<Option<PlatformEntry>, AgentError> {
        let url = self.url("/agent/manifest")?;
        let response = self
            .http
            .get(&url)
            .header("authorization", format!("Bearer {credential}"))
            .call()
            .map_err(Self::network(&url))?;
        let manifest: Manifest = Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))?;
        Ok(manifest.published(platform).cloned())
    }

    /// Streams `url` (see [`Client::url`] for which URLs are accepted) into `out`, calling `progress(done, total)`;
    /// returns the byte count. At most `max` bytes are written: a larger `Content-Length`, or a body that goes on
    /// past `max`, is an error before anything beyond `max` reaches `out`.
    pub fn download(
        &self,
        url: &str,
        credential: Option<&str>,
        max: u64,
        out: &mut impl Write,
        mut progress: impl FnMut(u64, Option<u64>),
    ) -> Result<u64, AgentError> {
        let url = self.url(url)?;
        let mut request = self.http.get(&url);
        if let Some(c) = credential {
            request = request.header("authorization", format!("Bearer {c}"));
        }
        let response = request.call().map_err(Self::network(&url))?;
        let mut response = Self::check(&url, response)?;
        let total = response.body().content_length();
        let too_long = |got: &str| {
            AgentError::Verification(format!("the server sent {got}, more than the {max} bytes it announced; aborted"))
        };
        if let Some(total) = total.filter(|&t| t > max) {
            return Err(too_long(&format!("Content-Length {total}")));
        }
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| AgentError::Network {
                url: crate::printable(&url),
                reason: crate::printable(&e.to_string()),
            })?;
            if n == 0 {
                break;
            }
            if done + n as u64 > max {
                return Err(too_long("more"));
            }
            out.write_all(&buf[..n]).map_err(AgentError::io("writing the download"))?;
            done += n as u64;
            progress(done, total);
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::new(base, None, false).unwrap()
    }

    #[test]
    fn links_stay_on_the_enrolled_origin() {
        let https = client("https://rm.example.com/");
        assert_eq!(https.url("/agent/manifest").unwrap(), "https://rm.example.com/agent/manifest");
        for same in ["https://rm.example.com/agent/binary?os=linux", "HTTPS://RM.example.com:443/agent/binary"] {
            assert_eq!(https.url(same).unwrap(), same, "{same}");
        }
        // Never downgraded, whatever the host.
        for http in ["http://rm.example.com/agent/binary", "http://rm.example.com:443/x", "http://other/x"] {
            let e = https.url(http).unwrap_err().to_string();
            assert!(e.contains("not downgrading"), "{http}: {e}");
        }
        // Another origin never gets the credential.
        for other in [
            "https://evil.example.com/agent/binary",
            "https://rm.example.com:8443/agent/binary",
            "https://rm.example.com@evil.example.com/x",
            "ftp://rm.example.com/x",
            "agent/binary",
        ] {
            let e = https.url(other).unwrap_err();
            assert!(matches!(e, AgentError::Untrusted(_)), "{other}: {e}");
        }
        let http = client("http://127.0.0.1:8080");
        assert_eq!(http.url("http://127.0.0.1:8080/a").unwrap(), "http://127.0.0.1:8080/a");
        assert!(http.url("https://127.0.0.1:8080/a").is_err(), "another scheme is another origin");
        assert!(http.url("http://127.0.0.1:8081/a").is_err());
        // A hostile link is shown escaped.
        let e = https.url("http://x/\u{1b}[2J\u{202e}").unwrap_err().to_string();
        assert!(!e.contains('\u{1b}') && !e.contains('\u{202e}'), "{e:?}");
    }
}
