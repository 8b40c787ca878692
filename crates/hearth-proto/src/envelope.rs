//! Signed envelopes: COSE_Sign1 (RFC 9052 §4.2) with ES256 (ECDSA P-256 and
//! SHA-256, RFC 9053 §2.1).
//!
//! The protected header carries the algorithm, the signer's key id and a
//! content type naming the kind of message, so a signature made for one
//! kind (say a state report) can never be accepted as another (a command).
//! Decoding gives an [`Unverified`] value whose payload cannot be read until
//! [`Unverified::verify`] has checked the signature.

use coset::{iana, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use p256::ecdsa::SigningKey;
use ring::signature::{self as ring_sig, EcdsaKeyPair, UnparsedPublicKey};

use crate::error::malformed;
use crate::keys::PublicKey;
use crate::{Error, MAX_FRAME_LEN};

/// The kinds of signed message. Each maps to one COSE content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Controller → device: a command.
    Command,
    /// Device → controller: the result of a command.
    CommandResult,
    /// Device → controllers: a state report.
    StateReport,
    /// Device → controller and cloud: "this controller is now my owner".
    PairConfirmation,
    /// Device → controllers: an end-to-end encrypted report or result (`e2e`).
    Sealed,
}

impl Kind {
    fn content_type(self) -> &'static str {
        match self {
            Kind::Command => "application/hearth.command.v1+cbor",
            Kind::CommandResult => "application/hearth.result.v1+cbor",
            Kind::StateReport => "application/hearth.state.v1+cbor",
            Kind::PairConfirmation => "application/hearth.pair-confirmation.v1+cbor",
            Kind::Sealed => "application/hearth.sealed.v1+cbor",
        }
    }

    fn from_content_type(ct: &str) -> Option<Self> {
        [Kind::Command, Kind::CommandResult, Kind::StateReport, Kind::PairConfirmation, Kind::Sealed]
            .into_iter()
            .find(|k| k.content_type() == ct)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::CommandResult => "command result",
            Kind::StateReport => "state report",
            Kind::PairConfirmation => "pairing confirmation",
            Kind::Sealed => "sealed envelope",
        }
    }
}

/// Signs `payload` as a tagged COSE_Sign1 with ES256.
pub fn sign(key: &SigningKey, kind: Kind, key_id: &[u8], payload: Vec<u8>) -> Result<Vec<u8>, Error> {
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .key_id(key_id.to_vec())
        .content_type(kind.content_type().to_owned())
        .build();
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        // RFC 9053 §2.1: the ES256 signature is r || s, 64 bytes.
        .try_create_signature(&[], |data| es256_sign(key, data))?
        .build();
    sign1.to_tagged_vec().map_err(|_| Error::Encode("COSE_Sign1"))
}

/// ES256 (RFC 9053 §2.1) over the COSE `Sig_structure` bytes: ECDSA P-256
/// with SHA-256, the signature as `r || s` (64 bytes).
///
/// The arithmetic is `ring`'s (assembly-backed P-256: ~8× faster than the
/// `p256` crate's here, which mattered for issue 8: every command costs the
/// device four signatures and the cloud and controller several checks);
/// keys stay `p256` types everywhere else. `ring` draws the nonce from the
/// operating system's generator rather than RFC 6979; both are valid ECDSA.
fn es256_sign(key: &SigningKey, data: &[u8]) -> Result<Vec<u8>, Error> {
    let rng = ring::rand::SystemRandom::new();
    let public = key.verifying_key().to_encoded_point(false);
    let pair = EcdsaKeyPair::from_private_key_and_public_key(
        &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.to_bytes(),
        public.as_bytes(),
        &rng,
    )
    .map_err(|_| Error::Encode("ES256 key"))?;
    let sig = pair.sign(&rng, data).map_err(|_| Error::Encode("ES256 signature"))?;
    Ok(sig.as_ref().to_vec())
}

/// Checks an ES256 signature (`r || s`, 64 bytes) with `ring`; see
/// [`es256_sign`] for why `ring`.
fn es256_verify(key: &PublicKey, data: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ring_sig::ECDSA_P256_SHA256_FIXED, key.to_sec1()).verify(data, sig).is_ok()
}

/// A decoded envelope whose signature has not been checked yet.
#[derive(Debug, Clone)]
pub struct Unverified {
    kind: Kind,
    key_id: Vec<u8>,
    sign1: CoseSign1,
}

impl Unverified {
    /// The kind named by the protected content type.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The signer's key id from the protected header (not yet authenticated).
    pub fn key_id(&self) -> &[u8] {
        &self.key_id
    }

    /// Checks the signature with `key` and hands out the payload.
    pub fn verify(self, key: &PublicKey) -> Result<Vec<u8>, Error> {
        let what = self.kind.name();
        self.sign1
            .verify_signature(&[], |sig, data| if es256_verify(key, data, sig) { Ok(()) } else { Err(()) })
            .map_err(|()| Error::BadSignature { what })?;
        self.sign1.payload.ok_or_else(|| malformed("envelope", "detached payloads are not used"))
    }

    /// The payload without any signature check. Only for routing hints
    /// that nothing relies on (see `message::peek_command`).
    pub(crate) fn into_unverified_payload(self) -> Vec<u8> {
        self.sign1.payload.unwrap_or_default()
    }

    /// Checks kind and signature in one step.
    pub fn verify_as(self, expected: Kind, key: &PublicKey) -> Result<Vec<u8>, Error> {
        if self.kind != expected {
            return Err(malformed(expected.name(), format!("envelope holds a {}", self.kind.name())));
        }
        self.verify(key)
    }
}

/// Decodes an envelope from a peer. Checks size, structure, algorithm and
/// content type; the signature is checked later by [`Unverified::verify`].
pub fn open(bytes: &[u8]) -> Result<Unverified, Error> {
    if bytes.len() > MAX_FRAME_LEN {
        return Err(Error::TooLarge { what: "envelope", len: bytes.len(), limit: MAX_FRAME_LEN });
    }
    // Accept the tagged form only; that is what `sign` produces.
    let sign1 = CoseSign1::from_tagged_slice(bytes)
        .or_else(|_| CoseSign1::from_slice(bytes).and(Err(coset::CoseError::UnexpectedItem("untagged", "tag 18"))))
        .map_err(|e| malformed("envelope", format!("not a COSE_Sign1: {e:?}")))?;
    let header = &sign1.protected.header;
    // RFC 9052 §3.1: `crit` lists headers we would have to understand; we understand none.
    if !header.crit.is_empty() {
        return Err(malformed("envelope", "critical headers are not supported"));
    }
    if header.alg != Some(coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES256)) {
        return Err(malformed("envelope", "algorithm must be ES256"));
    }
    let kind = match &header.content_type {
        Some(coset::ContentType::Text(ct)) => Kind::from_content_type(ct),
        _ => None,
    }
    .ok_or_else(|| malformed("envelope", "unknown content type"))?;
    if header.key_id.is_empty() || header.key_id.len() > 32 {
        return Err(malformed("envelope", "key id must be 1 to 32 bytes"));
    }
    if sign1.payload.is_none() {
        return Err(malformed("envelope", "missing payload"));
    }
    Ok(Unverified { kind, key_id: header.key_id.clone(), sign1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).expect("a constant scalar below the order")
    }

    #[test]
    fn round_trip_and_kind_separation() {
        let k = key(7);
        let signed = sign(&k, Kind::StateReport, b"kid", b"hello".to_vec()).unwrap();
        let pk = PublicKey::from(&k);
        assert_eq!(open(&signed).unwrap().verify_as(Kind::StateReport, &pk).unwrap(), b"hello");
        assert!(open(&signed).unwrap().verify_as(Kind::Command, &pk).is_err());
        let other = PublicKey::from(&key(8));
        assert_eq!(open(&signed).unwrap().verify(&other), Err(Error::BadSignature { what: "state report" }));
    }

    const FIXED: &str = "d284583aa301260378226170706c69636174696f6e2f6865617274682e636f6d6d616e642e76312b63626f720450ababababababababababababababababa041a05840785ff659dfc3e9bd220141de54693c6e5c8caab28d96ab65997b84cc0411509637e9f9cd33d9db7fb59ae2faf77c18183d1b2c8b58a01b9e399507d7b56e8504";

    /// Everything but the signature is a fixed vector, so any change to the
    /// encoding shows up as a diff. The signature (last 64 bytes) is random
    /// since signing moved to `ring` (ADR 0015); `FIXED` itself was signed by
    /// the `p256` crate (RFC 6979), so it also checks that `ring` verifies
    /// what another ES256 implementation signed, and the `p256` crate checks
    /// what `ring` signs.
    #[test]
    fn fixed_vector() {
        use p256::ecdsa::signature::Verifier as _;
        let fixed = hex::decode(FIXED).unwrap();
        let signed = sign(&key(1), Kind::Command, &[0xab; 16], vec![0xa0]).unwrap();
        assert_eq!(signed.len(), fixed.len());
        assert_eq!(hex::encode(&signed[..signed.len() - 64]), FIXED[..FIXED.len() - 128]);
        let pk = PublicKey::from(&key(1));
        assert_eq!(open(&fixed).unwrap().verify(&pk).unwrap(), vec![0xa0]);
        assert_eq!(open(&signed).unwrap().verify(&pk).unwrap(), vec![0xa0]);
        // The p256 crate over the same Sig_structure accepts ring's signature.
        let sign1 = coset::CoseSign1::from_tagged_slice(&signed).unwrap();
        sign1
            .verify_signature(&[], |sig, data| {
                let sig = p256::ecdsa::Signature::from_slice(sig).map_err(|_| ())?;
                pk.verifying_key().verify(data, &sig).map_err(|_| ())
            })
            .unwrap();
        let again = sign(&key(1), Kind::Command, &[0xab; 16], vec![0xa0]).unwrap();
        assert_ne!(signed, again, "ECDSA nonces must differ between signatures");
    }

    #[test]
    fn flipped_bits_never_verify() {
        let k = key(3);
        let pk = PublicKey::from(&k);
        let signed = sign(&k, Kind::Command, b"kid", b"payload".to_vec()).unwrap();
        for i in 0..signed.len() {
            let mut bad = signed.clone();
            bad[i] ^= 0x01;
            if let Ok(u) = open(&bad) {
                assert!(u.verify(&pk).is_err(), "byte {i} flipped still verified");
            }
        }
    }

    #[test]
    fn rejects_untagged_and_oversized() {
        assert!(open(&[0x84, 0x40, 0xa0, 0x40, 0x40]).is_err());
        assert!(matches!(open(&vec![0u8; MAX_FRAME_LEN + 1]), Err(Error::TooLarge { .. })));
    }
}
