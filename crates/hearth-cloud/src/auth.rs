//! Accounts and sessions: input rules, password hashing, session tokens.
//!
//! Passwords are hashed with Argon2id (RFC 9106) at the crate's default
//! parameters (19 MiB, 2 passes), on the blocking pool and at most
//! [`HASH_SLOTS`] at a time so a burst of logins cannot exhaust memory.
//! Session tokens are 32 random bytes; only their SHA-256 is stored, so a
//! database leak does not hand out live sessions.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Longest accepted email address (RFC 5321 path limit minus the brackets).
pub const MAX_EMAIL_LEN: usize = 254;
/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest accepted password, in characters (bounds hashing work).
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Concurrent Argon2 computations.
pub const HASH_SLOTS: usize = 4;

/// Normalises an email for storage and lookup: trimmed and lowercased.
pub fn normalize_email(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() || email.len() > MAX_EMAIL_LEN {
        return Err(ApiError::bad_request(format!("email must be 1 to {MAX_EMAIL_LEN} characters")));
    }
    let well_formed = email.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if !well_formed {
        return Err(ApiError::bad_request("email must look like name@example.com"));
    }
    Ok(email)
}

/// Whether a password has an acceptable length.
pub fn password_len_ok(password: &str) -> bool {
    (MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&password.chars().count())
}

/// Checks a new password.
pub fn check_new_password(password: &str) -> Result<(), ApiError> {
    if password_len_ok(password) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters")))
    }
}

/// Hashes a password into a PHC string (Argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(ApiError::internal)?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(ApiError::internal)
}

/// Checks a password against a stored PHC string. An unreadable hash
/// counts as a mismatch (and is logged), never as a match.
pub fn verify_password(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "stored password hash does not parse");
            false
        }
    }
}

/// A hash to check unknown emails against, so that "no such account" and
/// "wrong password" take the same time and cannot be told apart.
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random_password = hex::encode(rand::random::<[u8; 16]>());
        hash_password(&random_password).unwrap_or_default()
    })
}

/// A fresh session token (base64url text for the client) and its hash (for
/// the database).
pub fn new_token() -> (String, [u8; 32]) {
    let token = hearth_proto::b64::encode(rand::random::<[u8; 32]>());
    let hash = token_hash(&token);
    (token, hash)
}

/// SHA-256 of a token as presented.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The bearer token in an `Authorization` header value, if well-formed.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(normalize_email("  Alice@Example.COM \n").unwrap(), "alice@example.com");
        for bad in ["", "alice", "@example.com", "alice@", "a b@example.com", &format!("{}@x.y", "a".repeat(260))] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_lengths_count_characters() {
        assert!(!password_len_ok("1234567"));
        assert!(password_len_ok("12345678"));
        assert!(password_len_ok(&"é".repeat(1024)));
        assert!(!password_len_ok(&"a".repeat(1025)));
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "wrong horse"));
        assert!(!verify_password("not a hash", "correct horse"));
    }

    #[test]
    fn tokens_are_stored_only_as_hashes() {
        let (token, hash) = new_token();
        assert_eq!(token.len(), 43);
        assert_eq!(token_hash(&token), hash);
        assert_ne!(new_token().0, token);
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
