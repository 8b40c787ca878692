//! The sender half of HPKE (RFC 9180) for the one suite Hearth uses:
//! base mode, DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM.
//!
//! Why not the `hpke` crate, which [`crate::e2e`] still uses to *open*: its
//! P-256 arithmetic is generic field code, and a seal (one key generation
//! plus one Diffie-Hellman) cost ~0.6 ms there against ~0.1 ms with `ring`'s
//! P-256, which devices run twice per command (issue 8; see BENCHMARKS.md).
//! `ring` only does Diffie-Hellman with *ephemeral* private keys, which is
//! exactly the sender's side; the recipient's static key stays with `hpke`.
//! The key schedule below is small and checked against the RFC's test
//! vector (A.3.1) and against `hpke`'s `Open` in this module's tests, and
//! against pyhpke in `tests/interop`.

use hkdf::Hkdf;
use ring::agreement;
use sha2::Sha256;

use crate::Error;

/// RFC 9180 §7.1: KEM id of DHKEM(P-256, HKDF-SHA256).
const KEM_ID: u16 = 0x0010;
/// RFC 9180 §7.2: HKDF-SHA256.
const KDF_ID: u16 = 0x0001;
/// RFC 9180 §7.3: AES-128-GCM.
const AEAD_ID: u16 = 0x0001;
/// `Nsecret` of the KEM (§7.1).
const N_SECRET: usize = 32;
/// `Nk` and `Nn` of the AEAD (§7.3).
const N_K: usize = 16;
const N_N: usize = 12;
/// `Npk`/`Nenc` of the KEM: an uncompressed SEC1 point (§7.1.1).
pub(crate) const N_ENC: usize = 65;

/// §4.1: `suite_id = concat("KEM", I2OSP(kem_id, 2))`.
fn kem_suite() -> [u8; 5] {
    let k = KEM_ID.to_be_bytes();
    [b'K', b'E', b'M', k[0], k[1]]
}

/// §5.1: `suite_id = concat("HPKE", I2OSP(kem_id, 2), I2OSP(kdf_id, 2), I2OSP(aead_id, 2))`.
fn hpke_suite() -> [u8; 10] {
    let (k, d, a) = (KEM_ID.to_be_bytes(), KDF_ID.to_be_bytes(), AEAD_ID.to_be_bytes());
    [b'H', b'P', b'K', b'E', k[0], k[1], d[0], d[1], a[0], a[1]]
}

/// §4: `LabeledExtract(salt, label, ikm)`.
fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> [u8; 32] {
    let labeled_ikm = [b"HPKE-v1".as_slice(), suite, label, ikm].concat();
    let (prk, _) = Hkdf::<Sha256>::extract(Some(salt), &labeled_ikm);
    prk.into()
}

/// §4: `LabeledExpand(prk, label, info, L)`.
fn labeled_expand<const L: usize>(suite: &[u8], prk: &[u8; 32], label: &[u8], info: &[u8]) -> Result<[u8; L], Error> {
    let len = u16::try_from(L).map_err(|_| Error::Encode("HPKE expand length"))?.to_be_bytes();
    let labeled_info = [len.as_slice(), b"HPKE-v1", suite, label, info].concat();
    let mut out = [0u8; L];
    Hkdf::<Sha256>::from_prk(prk)
        .map_err(|_| Error::Encode("HPKE key schedule"))?
        .expand(&labeled_info, &mut out)
        .map_err(|_| Error::Encode("HPKE key schedule"))?;
    Ok(out)
}

/// §4.1 `ExtractAndExpand(dh, kem_context)` with `kem_context = enc || pkRm`.
fn shared_secret(dh: &[u8], enc: &[u8], pk_rm: &[u8]) -> Result<[u8; N_SECRET], Error> {
    let suite = kem_suite();
    let eae_prk = labeled_extract(&suite, b"", b"eae_prk", dh);
    labeled_expand::<N_SECRET>(&suite, &eae_prk, b"shared_secret", &[enc, pk_rm].concat())
}

/// §5.1 `KeySchedule` in base mode (no PSK): the AEAD key and base nonce.
fn key_schedule(shared_secret: &[u8; N_SECRET], info: &[u8]) -> Result<([u8; N_K], [u8; N_N]), Error> {
    const MODE_BASE: u8 = 0x00;
    let suite = hpke_suite();
    let psk_id_hash = labeled_extract(&suite, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(&suite, b"", b"info_hash", info);
    let context = [[MODE_BASE].as_slice(), &psk_id_hash, &info_hash].concat();
    let secret = labeled_extract(&suite, shared_secret, b"secret", b"");
    let key = labeled_expand::<N_K>(&suite, &secret, b"key", &context)?;
    let base_nonce = labeled_expand::<N_N>(&suite, &secret, b"base_nonce", &context)?;
    Ok((key, base_nonce))
}

/// §5.2 `Seal` of the first (and only) message: sequence number 0, so the
/// nonce is the base nonce itself.
fn aead_seal(key: &[u8; N_K], nonce: &[u8; N_N], aad: &[u8], pt: &[u8]) -> Result<Vec<u8>, Error> {
    use aes_gcm::aead::{Aead as _, KeyInit, Payload};
    let cipher = aes_gcm::Aes128Gcm::new_from_slice(key).map_err(|_| Error::Encode("HPKE key"))?;
    cipher.encrypt(nonce.into(), Payload { msg: pt, aad }).map_err(|_| Error::Encode("HPKE seal"))
}

/// §6.1 single-shot `Seal(pkR, info, aad, pt)` in base mode: returns the
/// encapsulated key `enc` (65 bytes) and the ciphertext. `pk_r` must be an
/// uncompressed SEC1 point; `ring` checks that it is on the curve (§7.1.4).
/// The ephemeral key (§4.1 `Encap`, `GenerateKeyPair`) comes from the
/// operating system's generator through `ring`.
pub(crate) fn seal(pk_r: &[u8], info: &[u8], aad: &[u8], pt: &[u8]) -> Result<([u8; N_ENC], Vec<u8>), Error> {
    let rng = ring::rand::SystemRandom::new();
    let sk_e = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
        .map_err(|_| Error::Encode("HPKE ephemeral key"))?;
    let enc: [u8; N_ENC] = sk_e
        .compute_public_key()
        .map_err(|_| Error::Encode("HPKE ephemeral key"))?
        .as_ref()
        .try_into()
        .map_err(|_| Error::Encode("HPKE ephemeral key"))?;
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, pk_r);
    // §4.1 `DH(skE, pkR)`: the x-coordinate of the shared point; `ring`
    // refuses a point not on the curve, which §7.1.4 requires.
    let ss = agreement::agree_ephemeral(sk_e, &peer, |dh| shared_secret(dh, &enc, pk_r))
        .map_err(|_| Error::InvalidKey("HPKE recipient key is not a P-256 point".into()))??;
    let (key, nonce) = key_schedule(&ss, info)?;
    Ok((enc, aead_seal(&key, &nonce, aad, pt)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpke::{Deserializable, Kem as _, OpModeR, Serializable};

    type Kem = hpke::kem::DhP256HkdfSha256;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).expect("test vector hex")
    }

    /// RFC 9180 Appendix A.3.1 (DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
    /// AES-128-GCM, base mode), first encryption. `ring` cannot take a given
    /// ephemeral key, so the DH is computed here with `p256` from `skEm`
    /// and everything after it is the code above.
    #[test]
    fn rfc9180_a_3_1_vector() {
        let sk_em = p256::SecretKey::from_slice(&unhex("4995788ef4b9d6132b249ce59a77281493eb39af373d236a1fe415cb0c2d7beb")).unwrap();
        let pk_em = unhex("04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4");
        let pk_rm = unhex("04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0");
        let pk_r = p256::PublicKey::from_sec1_bytes(&pk_rm).unwrap();
        let dh = p256::ecdh::diffie_hellman(sk_em.to_nonzero_scalar(), pk_r.as_affine());
        let ss = shared_secret(dh.raw_secret_bytes(), &pk_em, &pk_rm).unwrap();
        assert_eq!(ss.to_vec(), unhex("c0d26aeab536609a572b07695d933b589dcf363ff9d93c93adea537aeabb8cb8"));
        let (key, nonce) = key_schedule(&ss, &unhex("4f6465206f6e2061204772656369616e2055726e")).unwrap();
        assert_eq!(key.to_vec(), unhex("868c066ef58aae6dc589b6cfdd18f97e"));
        assert_eq!(nonce.to_vec(), unhex("4e0bc5018beba4bf004cca59"));
        let ct = aead_seal(&key, &nonce, &unhex("436f756e742d30"), &unhex("4265617574792069732074727574682c20747275746820626561757479")).unwrap();
        assert_eq!(ct, unhex("5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434"));
    }

    /// What this module seals, the `hpke` crate opens, and a changed byte
    /// anywhere (enc, ciphertext, info, aad) makes it fail.
    #[test]
    fn hpke_crate_opens_what_we_seal() {
        let (sk, pk) = Kem::gen_keypair(&mut rand::rngs::OsRng);
        let pk_bytes = pk.to_bytes();
        let (enc, ct) = seal(&pk_bytes, b"info", b"aad", b"sixteen byte key").unwrap();
        let open = |enc: &[u8], ct: &[u8], info: &[u8], aad: &[u8]| {
            let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).ok()?;
            hpke::single_shot_open::<hpke::aead::AesGcm128, hpke::kdf::HkdfSha256, Kem>(&OpModeR::Base, &sk, &enc, info, ct, aad).ok()
        };
        assert_eq!(open(&enc, &ct, b"info", b"aad").as_deref(), Some(b"sixteen byte key".as_slice()));
        let mut bad_enc = enc;
        bad_enc[40] ^= 1;
        assert_eq!(open(&bad_enc, &ct, b"info", b"aad"), None);
        let mut bad_ct = ct.clone();
        bad_ct[3] ^= 1;
        assert_eq!(open(&enc, &bad_ct, b"info", b"aad"), None);
        assert_eq!(open(&enc, &ct, b"other", b"aad"), None);
        assert_eq!(open(&enc, &ct, b"info", b"other"), None);
    }

    #[test]
    fn refuses_a_point_off_the_curve() {
        let mut not_a_point = [0u8; N_ENC];
        not_a_point[0] = 4;
        not_a_point[64] = 1;
        assert!(matches!(seal(&not_a_point, b"", b"", b"x"), Err(Error::InvalidKey(_))));
        assert!(seal(&[4u8; 10], b"", b"", b"x").is_err());
    }
}
