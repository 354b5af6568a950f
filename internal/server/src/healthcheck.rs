//! `restic-manager-server healthcheck`: probes `/healthz` (the image has no curl). Uses hyper's client connection API,
//! already a dependency through axum, instead of adding an HTTP client crate. When the server speaks TLS the probe
//! does too, and trusts exactly the key of the server's own certificate file (a local probe of 127.0.0.1 cannot
//! match the names of a public certificate, and must not trust anything else either).

use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Probes `url` and returns `Ok(())` only for a 2xx answer within `timeout`. For an `https://` URL, `pin` is the
/// only server key accepted.
pub async fn probe(url: &str, timeout: Duration, pin: Option<&str>) -> Result<(), String> {
    tokio::time::timeout(timeout, probe_inner(url, pin))
        .await
        .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
}

async fn probe_inner(url: &str, pin: Option<&str>) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let tls = match (uri.scheme_str(), pin) {
        (Some("http"), _) => None,
        (Some("https"), Some(pin)) => Some(pin.to_owned()),
        (Some("https"), None) => return Err(format!("{url:?}: https needs the server's certificate to pin")),
        _ => return Err(format!("{url:?}: only http:// and https:// URLs can be probed")),
    };
    let authority = uri.authority().ok_or_else(|| format!("{url:?} has no host"))?.clone();
    let port = authority.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let stream =
        tokio::net::TcpStream::connect((host, port)).await.map_err(|e| format!("connecting to {authority}: {e}"))?;
    let mut sender = match tls {
        None => handshake(TokioIo::new(stream), &authority).await?,
        Some(pin) => {
            let config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedKey {
                        pin,
                        algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
                    }))
                    .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a valid name").to_owned();
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake with {authority}: {e}"))?;
            handshake(TokioIo::new(stream), &authority).await?
        }
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::USER_AGENT, "restic-manager-healthcheck")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("request to {url}: {e}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {status}: {}", String::from_utf8_lossy(&body).trim()))
    }
}

async fn handshake<T>(
    io: TokioIo<T>,
    authority: &Authority,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP handshake with {authority}: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Accepts exactly one server key (the server's own certificate's), whatever the names and dates.
#[derive(Debug)]
struct PinnedKey {
    pin: String,
    /// The handshake signatures ring verifies (taken from the provider once).
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match rm_protocol::pin::pin_of_certificate(end_entity) {
            Ok(pin) if pin == self.pin => Ok(ServerCertVerified::assertion()),
            Ok(pin) => Err(rustls::Error::General(format!("the server's key is {pin}, not the local certificate's"))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
