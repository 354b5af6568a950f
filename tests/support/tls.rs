//! A TLS-terminating proxy in front of the real (plain-HTTP) server, with certificates made by rcgen, for the
//! key-pinning tests. Like the server's own TLS it answers `GET /tls/cert.pem` itself with the PEM certificate it
//! presents (`application/x-pem-file`); everything else is forwarded byte for byte to the upstream server. Its
//! certificate can be swapped while it runs (a renewal); connections accepted afterwards get the new one.
//!
//! One thread per connection, driving a rustls `ServerConnection` and the upstream socket with short read
//! timeouts. Only the first request of a connection is looked at for `/tls/cert.pem`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SerialNumber};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate and its key, as the proxy presents them.
#[derive(Clone)]
pub struct TestCert {
    pub pem: String,
    pub der: Vec<u8>,
    key_der: Vec<u8>,
    /// `sha256//…` of the key.
    pub pin: String,
}

/// How to make a self-signed test certificate.
pub struct CertSpec<'a> {
    pub names: &'a [&'a str],
    pub common_name: &'a str,
    pub serial: u64,
    /// `(year, month, day)`.
    pub not_before: (i32, u8, u8),
    pub not_after: (i32, u8, u8),
}

impl Default for CertSpec<'_> {
    /// Like the server's own: CN=restic-manager, localhost / 127.0.0.1 / ::1, valid 2020 to 2090.
    fn default() -> Self {
        CertSpec {
            names: &["localhost", "127.0.0.1", "::1"],
            common_name: "restic-manager",
            serial: 1,
            not_before: (2020, 1, 1),
            not_after: (2090, 1, 1),
        }
    }
}

/// A new ECDSA P-256 key (what the server generates).
pub fn new_key() -> KeyPair {
    KeyPair::generate().expect("generating a key")
}

/// A self-signed certificate for `key`.
pub fn self_signed(key: &KeyPair, spec: &CertSpec) -> TestCert {
    let mut params = CertificateParams::new(spec.names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("certificate names");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.common_name);
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from(spec.serial.to_be_bytes().to_vec()));
    let (y, m, d) = spec.not_before;
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = spec.not_after;
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let cert = params.self_signed(key).expect("self-signing");
    let der = cert.der().to_vec();
    let pin = pin_of_spki(&rcgen::PublicKeyData::subject_public_key_info(key));
    TestCert { pem: cert.pem(), der, key_der: key.serialize_der(), pin }
}

/// `sha256//<base64 SHA-256 of a DER SubjectPublicKeyInfo>` (curl's --pinnedpubkey form).
pub fn pin_of_spki(spki_der: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!("sha256//{}", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(spki_der)))
}

fn server_config(cert: &TestCert) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
        )
        .expect("certificate and key");
    Arc::new(config)
}

struct Current {
    config: Arc<rustls::ServerConfig>,
    pem: String,
}

/// The proxy; stops accepting on drop.
pub struct TlsProxy {
    addr: SocketAddr,
    current: Arc<RwLock<Current>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TlsProxy {
    /// Listens on 127.0.0.1 (a free port), presenting `cert`, forwarding to `upstream`.
    pub fn start(upstream: SocketAddr, cert: &TestCert) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let current = Arc::new(RwLock::new(Current { config: server_config(cert), pem: cert.pem.clone() }));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (current, stop) = (current.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let (config, pem) = {
                                let c = current.read().unwrap();
                                (c.config.clone(), c.pem.clone())
                            };
                            std::thread::spawn(move || {
                                let _ = serve(client, config, &pem, upstream);
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        TlsProxy { addr, current, stop, accept: Some(accept) }
    }

    /// Presents `cert` from the next connection on (a renewal, or a key change).
    pub fn set_cert(&self, cert: &TestCert) {
        *self.current.write().unwrap() = Current { config: server_config(cert), pem: cert.pem.clone() };
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Writes `bytes` through TLS, flushing records whenever rustls's plaintext buffer is full.
fn send(conn: &mut rustls::ServerConnection, client: &mut TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = conn.writer().write(bytes)?;
        bytes = &bytes[n..];
        while conn.wants_write() {
            conn.write_tls(client)?;
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// One client connection: TLS on `client`, plaintext to `upstream` (connected once the first request is known not
/// to be `/tls/cert.pem`).
fn serve(mut client: TcpStream, config: Arc<rustls::ServerConfig>, pem: &str, upstream: SocketAddr) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_millis(5)))?;
    let mut conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut head = Vec::new(); // the first request's bytes until it is classified
    let mut up: Option<TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle = 0u32;
    loop {
        let mut progressed = false;
        // Client → TLS engine.
        if conn.wants_read() {
            match conn.read_tls(&mut client) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    progressed = true;
                    if let Err(e) = conn.process_new_packets() {
                        let _ = conn.write_tls(&mut client);
                        return Err(io::Error::other(e));
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // Plaintext from the client.
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => {
                    if let Some(up) = &up {
                        let _ = up.shutdown(Shutdown::Write);
                    }
                    break;
                }
                Ok(n) => {
                    progressed = true;
                    match &mut up {
                        Some(up) => up.write_all(&buf[..n])?,
                        None => head.extend_from_slice(&buf[..n]),
                    }
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if up.is_none() && head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.starts_with(b"GET /tls/cert.pem ") || head.starts_with(b"GET /tls/cert.pem?") {
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-pem-file\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{pem}",
                    pem.len()
                );
                send(&mut conn, &mut client, response.as_bytes())?;
                conn.send_close_notify();
                while conn.wants_write() {
                    conn.write_tls(&mut client)?;
                }
                let _ = client.shutdown(Shutdown::Write);
                return Ok(());
            }
            let stream = TcpStream::connect(upstream)?;
            stream.set_read_timeout(Some(Duration::from_millis(5)))?;
            (&stream).write_all(&head)?;
            head.clear();
            up = Some(stream);
            progressed = true;
        }
        // Upstream → client.
        if let Some(stream) = &mut up {
            match stream.read(&mut buf) {
                Ok(0) => {
                    conn.send_close_notify();
                    while conn.wants_write() {
                        conn.write_tls(&mut client)?;
                    }
                    let _ = client.shutdown(Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => {
                    progressed = true;
                    send(&mut conn, &mut client, &buf[..n])?;
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e),
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut client)?;
            progressed = true;
        }
        idle = if progressed { 0 } else { idle + 1 };
        if idle > 12_000 {
            return Ok(()); // about a minute of silence
        }
    }
}
