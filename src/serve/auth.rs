//! Bearer-token auth for `automm.v1.Inference`: the start-up check of the configured token (length, TLS)
//! and the per-call interceptor that compares tokens in constant time.

use tonic::{Request, Status};

use super::ServeConfig;
use crate::error::{Error, Result};

/// Shortest bearer token `serve` accepts (after trimming whitespace).
pub const MIN_TOKEN_LEN: usize = 16;

/// Refuses an empty or short token (an empty one would let in a client sending `Bearer ` with nothing)
/// and warns when a token would travel without TLS.
pub(super) fn check_auth_config(cfg: &ServeConfig) -> Result<()> {
    let Some(token) = &cfg.auth_token else { return Ok(()) };
    let len = token.trim().chars().count();
    if len < MIN_TOKEN_LEN {
        return Err(Error::Server(format!(
            "--auth-token-file: the token has {len} characters; use at least {MIN_TOKEN_LEN} (for example 32 random \
             hex digits from `openssl rand -hex 16`)"
        )));
    }
    if cfg.tls.is_none() {
        tracing::warn!(
            "a bearer token is required but TLS is off: the token travels in plain text (add --tls-cert/--tls-key)"
        );
    }
    Ok(())
}

/// Checks `authorization: Bearer <token>` in constant time (both sides hashed first, so length leaks nothing).
#[derive(Clone)]
pub struct AuthCheck {
    pub(super) want: Option<[u8; 32]>,
}

pub(super) fn digest(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

impl tonic::service::Interceptor for AuthCheck {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        use subtle::ConstantTimeEq;
        let Some(want) = &self.want else { return Ok(req) };
        let got =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match got {
            Some(t) if bool::from(digest(t.as_bytes()).ct_eq(want)) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated("missing `authorization: Bearer <token>` metadata")),
        }
    }
}
