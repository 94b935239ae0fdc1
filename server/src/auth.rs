//! Who is asking: a token (Bearer, or Basic with the token as password), the trusted
//! headers `user_id` / `X-Organization-Id` from a trusted proxy address, or the
//! default user for a trusted address without credentials.

use crate::db::{Db, DbError, DEFAULT_USER};
use base64::Engine;
use std::net::IpAddr;

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `user-...`
    pub user_id: String,
    /// Display name (commit author of block API writes).
    pub user_name: String,
    /// The org everything is scoped to.
    pub org_id: String,
}

/// Why a caller could not be established.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No usable credentials (and not from a trusted address).
    #[error("authentication required")]
    Missing,
    /// A token or user id that does not exist.
    #[error("invalid credentials")]
    Invalid,
    /// `X-Organization-Id` names another org than the user's.
    #[error("X-Organization-Id does not match the user's organization")]
    OrgMismatch,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Which peers may use the trusted headers.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    /// Trusted addresses besides loopback.
    pub proxies: Vec<IpAddr>,
}

impl TrustPolicy {
    /// Whether `peer` may assert its identity with headers.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        peer.is_loopback()
            || matches!(peer, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
            || self.proxies.contains(&peer)
    }
}

/// Extract a token from an `Authorization` header value.
pub fn token_from_header(value: &str) -> Option<String> {
    let value = value.trim();
    if let Some(t) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    {
        let t = t.trim();
        return (!t.is_empty()).then(|| t.to_string());
    }
    let b64 = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (_user, pass) = s.split_once(':')?;
    (!pass.is_empty()).then(|| pass.to_string())
}

/// Resolve the caller. `authorization`, `user_id` and `org_id` are the raw header
/// values, if present.
pub async fn resolve(
    db: &Db,
    trust: &TrustPolicy,
    peer: IpAddr,
    authorization: Option<&str>,
    user_id: Option<&str>,
    org_id: Option<&str>,
) -> Result<Caller, AuthError> {
    if let Some(h) = authorization {
        let token = token_from_header(h).ok_or(AuthError::Invalid)?;
        let user = db.user_by_token(&token).await?.ok_or(AuthError::Invalid)?;
        return Ok(Caller {
            user_id: user.id,
            user_name: user.name,
            org_id: user.organization_id,
        });
    }
    if !trust.trusts(peer) {
        return Err(AuthError::Missing);
    }
    let user = db
        .user(user_id.unwrap_or(DEFAULT_USER))
        .await?
        .ok_or(AuthError::Invalid)?;
    match org_id {
        Some(o) if user_id.is_some() && o != user.organization_id => Err(AuthError::OrgMismatch),
        Some(o) if user_id.is_none() => {
            // An org asserted without a user: act as that org (it must exist).
            if !db.org_exists(o).await? {
                return Err(AuthError::Invalid);
            }
            Ok(Caller {
                user_id: user.id,
                user_name: user.name,
                org_id: o.to_string(),
            })
        }
        _ => Ok(Caller {
            user_id: user.id,
            user_name: user.name,
            org_id: user.organization_id,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_forms() {
        assert_eq!(token_from_header("Bearer abc").as_deref(), Some("abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("x:tok");
        assert_eq!(
            token_from_header(&format!("Basic {basic}")).as_deref(),
            Some("tok")
        );
        let empty = base64::engine::general_purpose::STANDARD.encode("x:");
        assert_eq!(token_from_header(&format!("Basic {empty}")), None);
        assert_eq!(token_from_header("Basic !!!"), None);
        assert_eq!(token_from_header("Digest x"), None);
        assert_eq!(token_from_header("Bearer "), None);
    }

    #[test]
    fn trust() {
        let t = TrustPolicy { proxies: vec![] };
        assert!(t.trusts("127.0.0.1".parse().unwrap()));
        assert!(t.trusts("::1".parse().unwrap()));
        assert!(t.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!t.trusts("10.0.0.1".parse().unwrap()));
    }
}
