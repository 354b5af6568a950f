//! Public key pins in the form `curl --pinnedpubkey` takes: `sha256//<base64 of SHA-256(SubjectPublicKeyInfo DER)>`.
//! The server prints its pin; `install.sh --pin` hands it to curl and to the agent, which checks the server's
//! certificate against it. A pin names a key, not a certificate, so it survives renewal when the key is kept.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Prefix of every pin.
pub const PREFIX: &str = "sha256//";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("not a certificate: {0}")]
    BadCertificate(String),
    #[error("{0:?} is not a pin: expected sha256// followed by 44 characters of base64")]
    BadPin(String),
}

/// The pin of a DER certificate's public key.
pub fn pin_of_certificate(der: &[u8]) -> Result<String, PinError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PinError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PinError::BadCertificate("trailing bytes after the certificate".into()));
    }
    Ok(pin_of_spki(cert.tbs_certificate.subject_pki.raw))
}

/// Whether a DER certificate signs itself (issuer = subject): such a certificate is trusted by no public CA store,
/// so clients need its pin.
pub fn is_self_signed(der: &[u8]) -> Result<bool, PinError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PinError::BadCertificate(e.to_string()))?;
    Ok(cert.issuer() == cert.subject())
}

/// The pin of a DER SubjectPublicKeyInfo.
pub fn pin_of_spki(spki_der: &[u8]) -> String {
    format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki_der)))
}

/// Checks the form of a pin given by an operator (`sha256//` + base64 of 32 bytes) and returns it normalised.
pub fn parse_pin(text: &str) -> Result<String, PinError> {
    let bad = || PinError::BadPin(text.chars().take(80).collect());
    let b64 = text.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad())?;
    if bytes.len() != 32 {
        return Err(bad());
    }
    Ok(format!("{PREFIX}{b64}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_strictly() {
        let good = format!("sha256//{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
        assert_eq!(parse_pin(&format!(" {good}\n")).unwrap(), good);
        for bad in ["", "sha256//", "sha1//AAAA", "sha256//not base64!", &format!("sha256//{}", "A".repeat(40))] {
            assert!(parse_pin(bad).is_err(), "{bad:?}");
        }
        assert!(pin_of_certificate(b"not der").is_err());
    }
}
