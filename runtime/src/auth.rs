//! Who may speak on the bus: what skald checks before an inbound message reaches a saga.
//!
//! Participants, orchestrators and operators are different principals on one NATS
//! (docs/security.md). The broker's permissions separate their subjects; this module
//! holds the two checks skald makes itself, both without a store read:
//!
//! - **Reply tokens.** Every command carries `Skald-Reply-Token`, an HMAC-SHA256 over
//!   the saga id, type, step, kind, attempt and idempotency key, under a key only the
//!   orchestrators hold ([`ReplyKeys`]). A participant copies it into its reply. A reply
//!   whose token does not verify was not written in answer to a command skald sent: it
//!   is dead-lettered as forged and never reaches the machine. A NATS permission keeps
//!   a service to its own reply subject; the token keeps it to the attempts it was sent,
//!   and keeps anyone who can publish there from inventing a saga's outcome.
//! - **Operator signatures.** An operator request may be signed with an NKey (ed25519);
//!   a runtime configured with an allowlist ([`crate::runtime::RuntimeOptions::operators`])
//!   applies only requests signed by a listed key, and records the listed name.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::wire::Envelope;

/// The shortest reply key accepted (bytes).
pub const MIN_KEY_LEN: usize = 16;

/// The name the store's shared secret is kept under when no key is configured
/// ([`crate::ports::SagaStore::shared_secret`]).
pub const REPLY_KEY_SECRET: &str = "reply-token";

/// Why a key set or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The reply keys are unusable.
    #[error("reply keys: {0}")]
    Keys(String),
    /// An operator key, seed or signature is unusable.
    #[error("operator key: {0}")]
    Operator(String),
}

/// The keys reply tokens are made and checked with: the first signs, every one verifies.
/// To rotate a key without a forged-looking reply: add the new key *second* on every
/// orchestrator (it verifies, nothing signs with it yet); then move it first everywhere
/// (it signs; the old one, second, still verifies replies to commands already sent);
/// once those commands are answered or timed out, drop the old key.
/// Its `Debug` shows how many keys there are, never their bytes.
#[derive(Clone)]
pub struct ReplyKeys(Arc<Vec<Vec<u8>>>);

impl fmt::Debug for ReplyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplyKeys({} key(s), redacted)", self.0.len())
    }
}

impl ReplyKeys {
    /// Keys of at least [`MIN_KEY_LEN`] bytes each; at least one.
    pub fn new(keys: impl IntoIterator<Item = Vec<u8>>) -> Result<Self, AuthError> {
        let keys: Vec<Vec<u8>> = keys.into_iter().collect();
        if keys.is_empty() {
            return Err(AuthError::Keys("at least one key is needed".into()));
        }
        if let Some((i, k)) = keys.iter().enumerate().find(|(_, k)| k.len() < MIN_KEY_LEN) {
            return Err(AuthError::Keys(format!(
                "key {} has {} bytes; at least {MIN_KEY_LEN} are needed",
                i + 1,
                k.len()
            )));
        }
        Ok(ReplyKeys(Arc::new(keys)))
    }

    /// Keys written as comma-separated hex (how `SKALD_REPLY_KEYS` holds them). The
    /// error never repeats the text.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        let keys = text
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .enumerate()
            .map(|(i, k)| {
                data_encoding::HEXLOWER_PERMISSIVE
                    .decode(k.as_bytes())
                    .map_err(|_| AuthError::Keys(format!("key {} is not hex", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        ReplyKeys::new(keys)
    }

    /// A fresh random key (32 bytes).
    pub fn generate_key() -> Vec<u8> {
        rand::random::<[u8; 32]>().to_vec()
    }

    fn mac(key: &[u8], env: &Envelope) -> Hmac<Sha256> {
        // Every key length is accepted by HMAC; `new` checked the minimum.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"skald-reply-token-v1");
        // Length-prefixed fields: no two envelopes share an input.
        for field in [
            env.saga_id.to_string().as_bytes(),
            env.saga_type.as_str().as_bytes(),
            env.step.as_str().as_bytes(),
            env.kind.as_str().as_bytes(),
            env.attempt.to_string().as_bytes(),
            env.idempotency_key.as_bytes(),
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac
    }

    /// The token of the command (or reply) with these header fields: 64 hex digits.
    pub fn token(&self, env: &Envelope) -> String {
        let tag = Self::mac(&self.0[0], env).finalize().into_bytes();
        data_encoding::HEXLOWER.encode(&tag)
    }

    /// Checks a reply's token against every key, in constant time per key.
    pub fn verify(&self, env: &Envelope, token: Option<&str>) -> Result<(), String> {
        let Some(token) = token else {
            return Err(format!(
                "no {} header (a participant must copy it from the command)",
                crate::wire::H_REPLY_TOKEN
            ));
        };
        let Ok(tag) = data_encoding::HEXLOWER_PERMISSIVE.decode(token.as_bytes()) else {
            return Err(format!("{} is not hex", crate::wire::H_REPLY_TOKEN));
        };
        if self
            .0
            .iter()
            .any(|key| Self::mac(key, env).verify_slice(&tag).is_ok())
        {
            Ok(())
        } else {
            Err(format!(
                "{} does not match the saga, step, kind, attempt and key of the reply",
                crate::wire::H_REPLY_TOKEN
            ))
        }
    }
}

/// Checks that `key` is a public user NKey (`U...`), as an operator allowlist holds.
pub fn check_operator_key(key: &str) -> Result<(), AuthError> {
    match nkeys::KeyPair::from_public_key(key) {
        Ok(_) if key.starts_with('U') => Ok(()),
        _ => Err(AuthError::Operator(format!(
            "{:?} is not a public user NKey (U...)",
            crate::ports::cap(key, 64)
        ))),
    }
}

/// Signs `bytes` with an NKey seed (`SU...`); base64url without padding.
pub fn sign(seed: &str, bytes: &[u8]) -> Result<(String, String), AuthError> {
    let pair = nkeys::KeyPair::from_seed(seed.trim())
        .map_err(|_| AuthError::Operator("not a valid NKey seed".into()))?;
    let signature = pair
        .sign(bytes)
        .map_err(|e| AuthError::Operator(format!("signing failed: {e}")))?;
    Ok((
        pair.public_key(),
        data_encoding::BASE64URL_NOPAD.encode(&signature),
    ))
}

/// Checks a signature made by [`sign`] with the key whose public half is `public_key`.
pub fn verify_signature(public_key: &str, bytes: &[u8], signature: &str) -> Result<(), String> {
    let pair = nkeys::KeyPair::from_public_key(public_key)
        .map_err(|_| "the operator key is not a public NKey".to_owned())?;
    let sig = data_encoding::BASE64URL_NOPAD
        .decode(signature.as_bytes())
        .map_err(|_| "the signature is not base64url".to_owned())?;
    pair.verify(bytes, &sig)
        .map_err(|_| "the signature does not verify".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CommandKind, SagaId, SagaType, StepName};

    fn env() -> Envelope {
        Envelope {
            saga_id: SagaId::new(),
            saga_type: SagaType::new("checkout").expect("type"),
            step: StepName::new("charge_payment").expect("step"),
            kind: CommandKind::Action,
            attempt: 2,
            idempotency_key: "k".into(),
        }
    }

    #[test]
    fn a_token_verifies_only_for_its_own_envelope_and_keys() {
        let keys = ReplyKeys::new([vec![7u8; 32]]).expect("keys");
        let e = env();
        let t = keys.token(&e);
        assert_eq!(t.len(), 64);
        assert!(keys.verify(&e, Some(&t)).is_ok());
        let mut other = e.clone();
        other.attempt = 3;
        assert!(keys.verify(&other, Some(&t)).is_err(), "attempt is covered");
        let mut other = e.clone();
        other.kind = CommandKind::Compensation;
        assert!(keys.verify(&other, Some(&t)).is_err(), "kind is covered");
        assert!(
            keys.verify(&e, None)
                .expect_err("no token")
                .contains("no Skald-Reply-Token")
        );
        assert!(keys.verify(&e, Some("zz")).is_err());
        let stranger = ReplyKeys::new([vec![8u8; 32]]).expect("keys");
        assert!(stranger.verify(&e, Some(&t)).is_err());
        // Rotation: the new key signs, the old one still verifies.
        let rotated = ReplyKeys::new([vec![8u8; 32], vec![7u8; 32]]).expect("keys");
        assert!(rotated.verify(&e, Some(&t)).is_ok());
        assert_ne!(rotated.token(&e), t);
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert!(ReplyKeys::new(Vec::<Vec<u8>>::new()).is_err());
        assert!(ReplyKeys::new([vec![1u8; 8]]).is_err());
        let keys =
            ReplyKeys::parse("00112233445566778899aabbccddeeff, ffeeddccbbaa99887766554433221100")
                .expect("hex keys");
        let shown = format!("{keys:?}");
        assert!(
            !shown.contains("0011") && shown.contains("2 key(s)"),
            "{shown}"
        );
        let err = ReplyKeys::parse("secret-not-hex").expect_err("not hex");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn signatures_verify_with_the_public_key_only() {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().expect("seed");
        let (public, sig) = sign(&seed, b"request").expect("sign");
        assert_eq!(public, pair.public_key());
        assert!(verify_signature(&public, b"request", &sig).is_ok());
        assert!(verify_signature(&public, b"other", &sig).is_err());
        let stranger = nkeys::KeyPair::new_user().public_key();
        assert!(verify_signature(&stranger, b"request", &sig).is_err());
        assert!(sign("SUnot-a-seed", b"x").is_err());
    }
}
