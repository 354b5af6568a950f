//! Bearer authentication: the admin token for `/api/v1/*` admin routes, agent credentials for heartbeats, and
//! (optionally) agent credentials or enrollment tokens for downloads. Every comparison is constant-time.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderMap;
use http::request::Parts;

use crate::{ApiError, AppState};

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Proof that the request carried the admin token. Add it as a handler argument to protect a route.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match bearer(&parts.headers) {
            None => Err(ApiError::Unauthorized("an admin bearer token is required")),
            Some(token) if state.admin_token().verify(token) => Ok(Admin),
            Some(_) => Err(ApiError::Unauthorized("the admin token is not valid")),
        }
    }
}

/// The peer address when the server runs on a socket (absent in in-process tests).
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)))
    }
}

/// Whether the connection a request arrived on speaks TLS (set by the connection loop for every request; absent in
/// in-process tests, where the server's own TLS setting decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTls(pub bool);

/// Whether secrets may be put in the answer to this request (`GET /api/v1/agents/config`): it arrived over TLS, or
/// from a loopback peer that is not a proxy, or from a `--trusted-proxies` proxy that says the client used https.
pub struct SecretsAllowed(pub bool);

impl FromRequestParts<AppState> for SecretsAllowed {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let tls = parts.extensions.get::<ConnTls>().map_or(state.tls().is_some(), |t| t.0);
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        Ok(SecretsAllowed(crate::public_url::secure_transport(
            tls,
            peer,
            &state.settings().trusted_proxies,
            &parts.headers,
        )))
    }
}

/// With `--require-download-auth`, downloads need a valid agent credential or an active enrollment token.
pub async fn require_download_auth(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.settings().require_download_auth {
        let token =
            bearer(request.headers()).ok_or(ApiError::Unauthorized("downloads require a bearer token"))?.to_owned();
        let valid = state
            .fleet()
            .call(move |c| {
                let now = rm_fleet::now();
                Ok(rm_fleet::authenticate_agent(c, &token)?.is_some()
                    || rm_fleet::check_enrollment_token(c, now, &token)?.is_ok())
            })
            .await?;
        if !valid {
            return Err(ApiError::Unauthorized("the download token is not valid"));
        }
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer ")), None);
        assert_eq!(bearer(&h("Bearerabc")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
