//! HTTP client for the server's agent API (ureq with rustls: a small static binary, no OpenSSL).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use rm_protocol::backup::{AgentConfigBody, LeaseGranted, LeaseRequest, ReportAck, ReportBatch};
use rm_protocol::restore::{AgentTasks, LsResult};
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

/// How the agent trusts the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The bundled web PKI roots.
    System,
    /// A PEM CA bundle (`--cacert`).
    CaFile(PathBuf),
    /// No verification (`--insecure`, testing only).
    Insecure,
    /// Only the stored certificate at `anchor`, whose key must have `pin` ([`crate::anchor`]).
    Pinned { pin: String, anchor: PathBuf },
}

pub struct Client {
    /// Rebuilt when a pinned server's renewed certificate (same key) becomes the anchor.
    http: RwLock<ureq::Agent>,
    base: String,
    origin: Origin,
    /// `(pin, anchor path)` when the server is pinned.
    pinned: Option<(String, PathBuf)>,
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

/// Whether `host` (as in a URL: IPv6 in brackets) is this machine: `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    })
}

/// Refuses plain http to anything but this machine unless the operator opted in: the enrollment token, the
/// credential and the agent binary would cross the network readable and changeable by anyone on the path.
/// `allowed` is `None` for a config written before the flag existed (allowed, with a warning).
pub fn check_plain_http(server: &str, allowed: Option<bool>) -> Result<(), AgentError> {
    let Some(origin) = Origin::of(server) else { return Ok(()) };
    if origin.scheme != "http" || is_loopback(&origin.host) {
        return Ok(());
    }
    match allowed {
        Some(true) => Ok(()),
        None => {
            eprintln!(
                "restic-manager-agent: warning: talking to {} over plain http (enrolled before --allow-plain-http \
                 existed); enroll again with https:// and --pin, or with --allow-plain-http to keep it",
                crate::printable(server)
            );
            Ok(())
        }
        Some(false) => Err(AgentError::Usage(format!(
            "refusing plain http to {}: the enrollment token, the agent's credential and the agent binary would \
             cross the network unencrypted and unauthenticated. Use https:// (for a self-signed server: --pin \
             sha256//…, as the server prints it), or pass --allow-plain-http (RM_ALLOW_PLAIN_HTTP=1) to enroll if \
             this network is trusted",
            crate::printable(server)
        ))),
    }
}

/// The rustls error inside a ureq error, if the failure was TLS.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

/// Whether a pinned server's certificate no longer chains to the stored anchor (renewed, or another key).
fn is_untrusted_issuer(e: &ureq::Error) -> bool {
    use rustls::CertificateError as C;
    matches!(rustls_error(e), Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)))
}

/// RFC 3339 (UTC) of Unix seconds.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// A failed request in words: TLS failures say what is wrong with the certificate or that the server does not
/// speak TLS; anything else is "cannot reach".
pub(crate) fn describe(url: &str, e: ureq::Error) -> AgentError {
    use rustls::CertificateError as C;
    let shown = crate::printable(url);
    let host = Origin::of(url).map(|o| o.host).unwrap_or_default();
    let server = Origin::of(url).map_or_else(|| shown.clone(), |o| o.to_string());
    let Some(tls) = rustls_error(&e) else {
        return AgentError::Network { url: shown, reason: crate::printable(&e.to_string()) };
    };
    let words = match tls {
        rustls::Error::InvalidCertificate(C::ExpiredContext { not_after, .. }) => {
            format!("the server's certificate has expired (not after {})", rfc3339(not_after.as_secs()))
        }
        rustls::Error::InvalidCertificate(C::Expired) => "the server's certificate has expired".to_string(),
        rustls::Error::InvalidCertificate(C::NotValidYetContext { not_before, .. }) => {
            format!("the server's certificate is not valid yet (not before {})", rfc3339(not_before.as_secs()))
        }
        rustls::Error::InvalidCertificate(C::NotValidYet) => "the server's certificate is not valid yet".to_string(),
        rustls::Error::InvalidCertificate(C::NotValidForNameContext { presented, .. }) => format!(
            "the server's certificate is not valid for host {host} (it names {})",
            crate::printable(&presented.join(", "))
        ),
        rustls::Error::InvalidCertificate(C::NotValidForName) => {
            format!("the server's certificate is not valid for host {host}")
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the server's certificate is not trusted (unknown issuer): for a self-signed server pass --pin \
             sha256//… (the server prints it), or --cacert FILE"
                .to_string()
        }
        rustls::Error::InvalidMessage(_) => {
            format!("the server at {server} does not speak TLS; use http:// or enable TLS on the server")
        }
        other => format!("TLS with {server} failed: {}", crate::printable(&other.to_string())),
    };
    AgentError::Tls(format!("{words} ({shown})"))
}

impl Client {
    /// A client for `server`. Refuses, before any connection, plain http to a host that is not this machine unless
    /// `allow_plain_http`, and a pinned anchor whose key is not the pin.
    pub fn new(server: &str, trust: &Trust, allow_plain_http: Option<bool>) -> Result<Client, AgentError> {
        let (base, origin) = Self::origin(server)?;
        check_plain_http(&base, allow_plain_http)?;
        let base = base.as_str();
        match trust {
            Trust::Pinned { pin, anchor } => {
                let leaf = crate::anchor::load(anchor, pin)?;
                Self::pinned(base, pin, anchor, &leaf)
            }
            _ => {
                let tls = Self::tls(trust)?;
                Ok(Client {
                    http: RwLock::new(Self::agent(&origin, tls)),
                    base: base.to_string(),
                    origin,
                    pinned: None,
                })
            }
        }
    }

    /// A client trusting only `leaf` (DER), whose key has `pin`; `anchor` is where a renewed certificate with the
    /// same key is stored.
    pub fn pinned(server: &str, pin: &str, anchor: &Path, leaf: &[u8]) -> Result<Client, AgentError> {
        let (base, origin) = Self::origin(server)?;
        if origin.scheme != "https" {
            return Err(AgentError::Usage(format!(
                "--pin needs an https:// server URL, not {}",
                crate::printable(server)
            )));
        }
        let http = Self::agent(&origin, Self::anchored(leaf));
        Ok(Client { http: RwLock::new(http), base, origin, pinned: Some((pin.to_string(), anchor.to_path_buf())) })
    }

    fn origin(server: &str) -> Result<(String, Origin), AgentError> {
        let base = server.trim_end_matches('/').to_string();
        let origin = Origin::of(&base)
            .ok_or_else(|| AgentError::Usage(format!("server URL must start with http:// or https://: {server}")))?;
        Ok((base, origin))
    }

    fn anchored(leaf: &[u8]) -> TlsConfig {
        let root = ureq::tls::Certificate::from_der(leaf).to_owned();
        TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[root])).build()
    }

    fn tls(trust: &Trust) -> Result<TlsConfig, AgentError> {
        let mut tls = TlsConfig::builder().disable_verification(*trust == Trust::Insecure);
        if let Trust::CaFile(path) = trust {
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
        Ok(tls.build())
    }

    fn agent(origin: &Origin, tls: TlsConfig) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Enrolled over https: never talk plain http, not even through a redirect.
            .https_only(origin.scheme == "https")
            // The protocol never redirects, and a redirected request would lose its credential anyway.
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .user_agent(format!("restic-manager-agent/{}", rm_buildinfo::current().version))
            .tls_config(tls)
            .build()
            .into()
    }

    /// Sends one request with the current agent. A pinned server whose certificate no longer chains to the stored
    /// anchor gets one chance: if it now serves a certificate with the pinned key (renewed, key kept), that becomes
    /// the anchor and the request is sent once more; another key is refused.
    fn send(
        &self,
        url: &str,
        request: impl Fn(&ureq::Agent) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>, AgentError> {
        let agent = self.http.read().unwrap_or_else(|p| p.into_inner()).clone();
        match request(&agent) {
            Ok(r) => Ok(r),
            Err(e) if self.pinned.is_some() && is_untrusted_issuer(&e) => {
                let (pin, anchor) = self.pinned.as_ref().expect("checked");
                let leaf = crate::anchor::fetch_pinned_leaf(&self.base, pin)?;
                if crate::anchor::load(anchor, pin).is_ok_and(|stored| stored == leaf) {
                    return Err(describe(url, e)); // the same certificate: re-anchoring would change nothing
                }
                crate::anchor::save(anchor, &leaf)?;
                eprintln!(
                    "restic-manager-agent: the server renewed its certificate with the pinned key {pin}; \
                     stored it as the new anchor ({})",
                    anchor.display()
                );
                let agent = Self::agent(&self.origin, Self::anchored(&leaf));
                *self.http.write().unwrap_or_else(|p| p.into_inner()) = agent.clone();
                request(&agent).map_err(|e| describe(url, e))
            }
            Err(e) => Err(describe(url, e)),
        }
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
        move |e| describe(url, e)
    }

    pub fn enroll(&self, token: &str, facts: HostFacts) -> Result<EnrollResponse, AgentError> {
        let url = self.url("/api/v1/agents/enroll")?;
        let body = EnrollRequest::new(token, facts);
        let response = self.send(&url, |http| http.post(&url).send_json(&body))?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    pub fn heartbeat(&self, credential: &str, request: &HeartbeatRequest) -> Result<HeartbeatResponse, AgentError> {
        let url = self.url("/api/v1/agents/heartbeat")?;
        let response = self.send(&url, |http| {
            http.post(&url).header("authorization", format!("Bearer {credential}")).send_json(request)
        })?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    /// `GET /api/v1/agents/config`: the plans and repositories (with their secrets) this agent runs.
    pub fn agent_config(&self, credential: &str) -> Result<AgentConfigBody, AgentError> {
        let url = self.url("/api/v1/agents/config")?;
        let response =
            self.send(&url, |http| http.get(&url).header("authorization", format!("Bearer {credential}")).call())?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    /// `POST /api/v1/agents/reports`: a batch of operation reports, all stored (or already stored) on a 200.
    pub fn post_reports(&self, credential: &str, batch: &ReportBatch) -> Result<ReportAck, AgentError> {
        let url = self.url("/api/v1/agents/reports")?;
        let response = self.send(&url, |http| {
            http.post(&url).header("authorization", format!("Bearer {credential}")).send_json(batch)
        })?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    /// `POST /api/v1/agents/leases`: takes or renews a repository's run lease. A 409 `repository_busy` is
    /// [`Lease::Busy`] with the server's `retry_after_secs` (default 30 s when it names none); a 409
    /// `maintenance_done` is [`Lease::Done`].
    pub fn take_lease(&self, credential: &str, request: &LeaseRequest) -> Result<Lease, AgentError> {
        let url = self.url("/api/v1/agents/leases")?;
        let mut response = self.send(&url, |http| {
            http.post(&url).header("authorization", format!("Bearer {credential}")).send_json(request)
        })?;
        if response.status().as_u16() == 409 {
            let body: Option<ErrorBody> = response.body_mut().read_json().ok();
            match body {
                Some(body) if body.error == "repository_busy" => {
                    return Ok(Lease::Busy { retry_after_secs: retry_after(&body).unwrap_or(30) });
                }
                Some(body) if body.error == rm_protocol::maintenance::MAINTENANCE_DONE => return Ok(Lease::Done),
                // Another refusal (`maintenance_exhausted`): said as the server said it.
                Some(body) => {
                    return Err(AgentError::Server {
                        status: 409,
                        code: crate::printable(&body.error),
                        message: crate::printable(&body.message),
                    });
                }
                None => {}
            }
            return Err(AgentError::Server {
                status: 409,
                code: "unknown".into(),
                message: format!("unexpected answer from {}", crate::printable(&url)),
            });
        }
        Self::check(&url, response)?.body_mut().read_json().map(Lease::Granted).map_err(Self::network(&url))
    }

    /// `DELETE /api/v1/agents/leases/{repository}?operation_id=`: gives the lease back.
    pub fn release_lease(&self, credential: &str, repository: &str, operation_id: &str) -> Result<(), AgentError> {
        let url = self.url(&format!(
            "/api/v1/agents/leases/{}?operation_id={}",
            percent_encode(repository),
            percent_encode(operation_id)
        ))?;
        let response =
            self.send(&url, |http| http.delete(&url).header("authorization", format!("Bearer {credential}")).call())?;
        Self::check(&url, response).map(drop)
    }

    /// `GET /api/v1/agents/tasks?wait=&seen=`: what the server has for this agent, once something new arrives or
    /// after `wait_secs`. `Ok(None)`: the server answers 404 (it is older than the long-poll).
    pub fn tasks(&self, credential: &str, seen: Option<u64>, wait_secs: u64) -> Result<Option<AgentTasks>, AgentError> {
        let query = match seen {
            Some(seen) => format!("?wait={wait_secs}&seen={seen}"),
            None => format!("?wait={wait_secs}"),
        };
        let url = self.url(&format!("/api/v1/agents/tasks{query}"))?;
        let response =
            self.send(&url, |http| http.get(&url).header("authorization", format!("Bearer {credential}")).call())?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        Self::check(&url, response)?.body_mut().read_json().map(Some).map_err(Self::network(&url))
    }

    /// `POST /api/v1/agents/tasks/{request_id}`: the answer to a listing task.
    pub fn post_ls_result(&self, credential: &str, request_id: &str, result: &LsResult) -> Result<(), AgentError> {
        let url = self.url(&format!("/api/v1/agents/tasks/{}", percent_encode(request_id)))?;
        let response = self.send(&url, |http| {
            http.post(&url).header("authorization", format!("Bearer {credential}")).send_json(result)
        })?;
        Self::check(&url, response).map(drop)
    }

    /// The published manifest entry for one platform. The credential is sent because a server started with
    /// `--require-download-auth` answers 401 without it.
    pub fn served_build(&self, platform: Platform, credential: &str) -> Result<Option<PlatformEntry>, AgentError> {
        let url = self.url("/agent/manifest")?;
        let response =
            self.send(&url, |http| http.get(&url).header("authorization", format!("Bearer {credential}")).call())?;
        let manifest: Manifest = Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))?;
        Ok(manifest.published(platform).cloned())
    }

    /// The published restic for one platform, from the manifest (`None`: none published, or a server older than
    /// served restic).
    pub fn served_restic(
        &self,
        platform: Platform,
        credential: &str,
    ) -> Result<Option<rm_protocol::restic_dist::ResticEntry>, AgentError> {
        let url = self.url("/agent/manifest")?;
        let response =
            self.send(&url, |http| http.get(&url).header("authorization", format!("Bearer {credential}")).call())?;
        let manifest: Manifest = Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))?;
        Ok(manifest.restic.into_iter().find(|e| e.published && e.platform() == Some(platform)))
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
        let response = self.send(&url, |http| {
            let mut request = http.get(&url);
            if let Some(c) = credential {
                request = request.header("authorization", format!("Bearer {c}"));
            }
            request.call()
        })?;
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

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    Granted(LeaseGranted),
    /// Another agent runs restic on the repository; ask again after this long.
    Busy {
        retry_after_secs: u64,
    },
    /// (Maintenance leases) a successful run already covered the slot asked for: skip it.
    Done,
}

/// `retry_after_secs` of an error body: a top-level detail (the protocol's flattened details), or inside `details`.
fn retry_after(body: &ErrorBody) -> Option<u64> {
    let top = body.details.get("retry_after_secs");
    let nested = body.details.get("details").and_then(|d| d.get("retry_after_secs"));
    top.or(nested).and_then(serde_json::Value::as_u64)
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a path segment or a query value).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::new(base, &Trust::System, Some(true)).unwrap()
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

    #[test]
    fn loopback_hosts_and_the_plain_http_gate() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "[::1]", "::1", "[::ffff:127.0.0.1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "192.168.1.1", "rm.example.com", "localhost.example.com", "[::2]", "0.0.0.0", ""] {
            assert!(!is_loopback(host), "{host}");
        }
        assert!(check_plain_http("http://127.0.0.1:8080", Some(false)).is_ok());
        assert!(check_plain_http("http://[::1]:8080", Some(false)).is_ok());
        assert!(check_plain_http("https://rm.example.com", Some(false)).is_ok());
        let e = check_plain_http("http://rm.example.com", Some(false)).unwrap_err().to_string();
        assert!(e.contains("--allow-plain-http") && e.contains("unencrypted"), "{e}");
        assert!(check_plain_http("http://rm.example.com", Some(true)).is_ok());
        assert!(check_plain_http("http://rm.example.com", None).is_ok(), "a config from before the flag keeps working");
        // Refused before any connection: a name that cannot resolve fails on the gate, not on DNS.
        let e = Client::new("http://rm.invalid:1", &Trust::System, Some(false)).err().unwrap().to_string();
        assert!(e.contains("refusing plain http"), "{e}");
    }

    #[test]
    fn lease_details_and_encoding() {
        let top: ErrorBody =
            serde_json::from_str(r#"{"error":"repository_busy","message":"m","retry_after_secs":7}"#).unwrap();
        assert_eq!(retry_after(&top), Some(7));
        let nested: ErrorBody =
            serde_json::from_str(r#"{"error":"repository_busy","message":"m","details":{"retry_after_secs":9}}"#)
                .unwrap();
        assert_eq!(retry_after(&nested), Some(9));
        assert_eq!(retry_after(&ErrorBody::new("repository_busy", "m")), None);
        assert_eq!(percent_encode("repo-1_a.b~"), "repo-1_a.b~");
        assert_eq!(percent_encode("a b/c?d"), "a%20b%2Fc%3Fd");
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
    }
}
