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
}

impl Client {
    pub fn new(server: &str, cacert: Option<&Path>, insecure: bool) -> Result<Client, AgentError> {
        let base = server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(AgentError::Usage(format!("server URL must start with http:// or https://: {server}")));
        }
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
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .user_agent(format!("restic-manager-agent/{}", rm_buildinfo::current().version))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Client { http, base })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Absolute URL for a server path or an absolute URL the server sent.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{path_or_url}", self.base)
        }
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
        Err(match body {
            Some(b) => AgentError::Server { status, code: b.error, message: b.message },
            None => {
                AgentError::Server { status, code: "unknown".into(), message: format!("unexpected answer from {url}") }
            }
        })
    }

    fn network(url: &str) -> impl FnOnce(ureq::Error) -> AgentError + '_ {
        move |e| AgentError::Network { url: url.to_string(), reason: e.to_string() }
    }

    pub fn enroll(&self, token: &str, facts: HostFacts) -> Result<EnrollResponse, AgentError> {
        let url = self.url("/api/v1/agents/enroll");
        let response = self.http.post(&url).send_json(EnrollRequest::new(token, facts)).map_err(Self::network(&url))?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    pub fn heartbeat(&self, credential: &str, request: &HeartbeatRequest) -> Result<HeartbeatResponse, AgentError> {
        let url = self.url("/api/v1/agents/heartbeat");
        let response = self
            .http
            .post(&url)
            .header("authorization", format!("Bearer {credential}"))
            .send_json(request)
            .map_err(Self::network(&url))?;
        Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))
    }

    /// The published manifest entry for one platform.
    pub fn served_build(&self, platform: Platform) -> Result<Option<PlatformEntry>, AgentError> {
        let url = self.url("/agent/manifest");
        let response = self.http.get(&url).call().map_err(Self::network(&url))?;
        let manifest: Manifest = Self::check(&url, response)?.body_mut().read_json().map_err(Self::network(&url))?;
        Ok(manifest.published(platform).cloned())
    }

    /// Streams `url` into `out`, calling `progress(done, total)`; returns the byte count.
    pub fn download(
        &self,
        url: &str,
        credential: Option<&str>,
        out: &mut impl Write,
        mut progress: impl FnMut(u64, Option<u64>),
    ) -> Result<u64, AgentError> {
        let url = self.url(url);
        let mut request = self.http.get(&url);
        if let Some(c) = credential {
            request = request.header("authorization", format!("Bearer {c}"));
        }
        let response = request.call().map_err(Self::network(&url))?;
        let mut response = Self::check(&url, response)?;
        let total = response.body().content_length();
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        loop {
            let n =
                reader.read(&mut buf).map_err(|e| AgentError::Network { url: url.clone(), reason: e.to_string() })?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(AgentError::io("writing the download"))?;
            done += n as u64;
            progress(done, total);
        }
        Ok(done)
    }
}
