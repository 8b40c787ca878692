//! Keys and signatures in TUF's key format (spec 4.2 "KEYS"): the
//! `{"keytype", "scheme", "keyval": {"public"}}` objects of root and
//! delegations, as python-tuf/securesystemslib write them.
//!
//! Verification: ed25519 (hex public key), ecdsa-sha2-nistp256/384 (PEM
//! SubjectPublicKeyInfo or hex point, DER signature), and RSA (PEM SPKI) with
//! rsassa-pss-sha256/384/512 or rsa-pkcs1v15-sha256/384/512.
//! Keys of any other type parse (a root may list them) but never verify.
//! Signing (repository tools only): ed25519 and ecdsa-sha2-nistp256.

use base64::Engine as _;
use ring::signature::{self, KeyPair as _};
use serde_json::{json, Value};

use crate::{canonical, Error};

/// The key material a signature is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Material {
    Ed25519(Vec<u8>),
    /// Uncompressed SEC1 point.
    EcdsaP256(Vec<u8>),
    /// Uncompressed SEC1 point on P-384.
    EcdsaP384(Vec<u8>),
    /// DER `RSAPublicKey` (PKCS#1) and the scheme's algorithm.
    Rsa(Vec<u8>, RsaScheme),
    /// A key type or scheme this client does not implement.
    Unsupported,
}

/// A public key from metadata.
#[derive(Clone, Debug)]
pub struct PublicKey {
    keytype: String,
    scheme: String,
    /// The `keyval.public` string exactly as in metadata.
    public: String,
    material: Material,
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.keytype == other.keytype && self.scheme == other.scheme && self.public == other.public
    }
}

impl PublicKey {
    /// Parses a key object. Unknown types and schemes parse as keys that
    /// never verify, so one exotic key cannot make a whole root unreadable.
    ///
    /// # Errors
    /// [`Error::Malformed`] if the object lacks `keytype`, `scheme` or `keyval`.
    pub fn from_value(v: &Value) -> Result<Self, Error> {
        let field = |name: &str| -> Result<String, Error> {
            v.get(name).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| Error::malformed("key", format!("missing string {name}")))
        };
        let keytype = field("keytype")?;
        let scheme = field("scheme")?;
        let keyval = v.get("keyval").and_then(Value::as_object).ok_or_else(|| Error::malformed("key", "missing keyval"))?;
        let public = keyval.get("public").and_then(Value::as_str).unwrap_or_default().to_owned();
        let material = match (keytype.as_str(), scheme.as_str()) {
            ("ed25519", "ed25519") => match hex::decode(&public) {
                Ok(raw) if raw.len() == 32 => Material::Ed25519(raw),
                _ => Material::Unsupported,
            },
            ("ecdsa" | "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256") => ec_point(&public, SpkiAlg::P256).map_or(Material::Unsupported, Material::EcdsaP256),
            ("ecdsa" | "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp384") => ec_point(&public, SpkiAlg::P384).map_or(Material::Unsupported, Material::EcdsaP384),
            ("rsa", scheme) => match (RsaScheme::from_name(scheme), spki_from_pem(&public).and_then(|d| spki_key(&d, SpkiAlg::Rsa))) {
                (Some(scheme), Some(key)) => Material::Rsa(key, scheme),
                _ => Material::Unsupported,
            },
            _ => Material::Unsupported,
        };
        Ok(PublicKey { keytype, scheme, public, material })
    }

    /// The key object as metadata holds it.
    pub fn to_value(&self) -> Value {
        json!({"keytype": self.keytype, "scheme": self.scheme, "keyval": {"public": self.public}})
    }

    /// The conventional key id: hex SHA-256 of the key's canonical JSON
    /// (spec 4.2 "KEYID"). Clients look keys up by the id in metadata and do
    /// not recompute it; repository tools use this to name new keys.
    pub fn key_id(&self) -> String {
        // A key object holds only strings, so canonical encoding cannot fail.
        let bytes = canonical::encode(&self.to_value()).unwrap_or_default();
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes))
    }

    /// True if `sig` is a valid signature over `msg` by this key.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let (alg, key): (&dyn signature::VerificationAlgorithm, &[u8]) = match &self.material {
            Material::Ed25519(k) => (&signature::ED25519, k),
            Material::EcdsaP256(k) => (&signature::ECDSA_P256_SHA256_ASN1, k),
            Material::EcdsaP384(k) => (&signature::ECDSA_P384_SHA384_ASN1, k),
            Material::Rsa(k, scheme) => (scheme.algorithm(), k),
            Material::Unsupported => return false,
        };
        signature::UnparsedPublicKey::new(alg, key).verify(msg, sig).is_ok()
    }

    /// Raw material, for counting distinct keys towards a threshold.
    pub(crate) fn material_bytes(&self) -> Option<&[u8]> {
        match &self.material {
            Material::Ed25519(k) | Material::EcdsaP256(k) | Material::EcdsaP384(k) | Material::Rsa(k, _) => Some(k),
            Material::Unsupported => None,
        }
    }
}

#[derive(Clone, Copy)]
enum SpkiAlg {
    P256,
    P384,
    Rsa,
}

/// RSA signature schemes securesystemslib names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RsaScheme {
    PssSha256,
    PssSha384,
    PssSha512,
    Pkcs1Sha256,
    Pkcs1Sha384,
    Pkcs1Sha512,
}

impl RsaScheme {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "rsassa-pss-sha256" => RsaScheme::PssSha256,
            "rsassa-pss-sha384" => RsaScheme::PssSha384,
            "rsassa-pss-sha512" => RsaScheme::PssSha512,
            "rsa-pkcs1v15-sha256" => RsaScheme::Pkcs1Sha256,
            "rsa-pkcs1v15-sha384" => RsaScheme::Pkcs1Sha384,
            "rsa-pkcs1v15-sha512" => RsaScheme::Pkcs1Sha512,
            _ => return None,
        })
    }

    fn algorithm(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            RsaScheme::PssSha256 => &signature::RSA_PSS_2048_8192_SHA256,
            RsaScheme::PssSha384 => &signature::RSA_PSS_2048_8192_SHA384,
            RsaScheme::PssSha512 => &signature::RSA_PSS_2048_8192_SHA512,
            RsaScheme::Pkcs1Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            RsaScheme::Pkcs1Sha384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            RsaScheme::Pkcs1Sha512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        }
    }
}

/// An EC public key as PEM SPKI (securesystemslib) or as the hex of the
/// uncompressed point (older repositories, e.g. early Sigstore roots).
fn ec_point(public: &str, curve: SpkiAlg) -> Option<Vec<u8>> {
    let len = match curve {
        SpkiAlg::P384 => 97,
        _ => 65,
    };
    if let Ok(raw) = hex::decode(public) {
        return (raw.len() == len && raw[0] == 4).then_some(raw);
    }
    spki_from_pem(public).and_then(|d| spki_key(&d, curve))
}

fn spki_from_pem(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem.lines().map(str::trim).filter(|l| !l.starts_with("-----") && !l.is_empty()).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Reads one DER TLV: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// Extracts the key from a SubjectPublicKeyInfo after checking its algorithm.
fn spki_key(spki: &[u8], want: SpkiAlg) -> Option<Vec<u8>> {
    let (0x30, body, []) = der(spki)? else { return None };
    let (0x30, alg, rest) = der(body)? else { return None };
    let (0x03, bits, []) = der(rest)? else { return None };
    let (0x06, oid, params) = der(alg)? else { return None };
    match want {
        SpkiAlg::P256 | SpkiAlg::P384 => {
            let (0x06, curve, []) = der(params)? else { return None };
            let want_curve = if matches!(want, SpkiAlg::P256) { OID_P256 } else { OID_P384 };
            if oid != OID_EC_PUBLIC_KEY || curve != want_curve {
                return None;
            }
        }
        SpkiAlg::Rsa => {
            if oid != OID_RSA {
                return None;
            }
        }
    }
    let (&0, key) = bits.split_first()? else { return None };
    Some(key.to_vec())
}

/// A private signing key (repository side only; never on a device).
pub struct SigningKey {
    pair: Pair,
    pkcs8: Vec<u8>,
    public: PublicKey,
}

enum Pair {
    Ed25519(signature::Ed25519KeyPair),
    Ecdsa(signature::EcdsaKeyPair),
}

/// Which kind of key to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ed25519 (default: small, deterministic signatures).
    Ed25519,
    /// ECDSA over P-256 with SHA-256.
    EcdsaP256,
}

const PEM_LABEL: &str = "PRIVATE KEY";

impl SigningKey {
    /// Generates a new key from the system's secure random source.
    ///
    /// # Errors
    /// [`Error::Key`] if the random source fails.
    pub fn generate(kind: KeyKind) -> Result<Self, Error> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = match kind {
            KeyKind::Ed25519 => signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| Error::Key("ed25519 generation failed".into()))?,
            KeyKind::EcdsaP256 => signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                .map_err(|_| Error::Key("ecdsa generation failed".into()))?,
        };
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// Loads a PKCS#8 DER private key (ed25519 or P-256).
    ///
    /// # Errors
    /// [`Error::Key`] if it is neither.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, Error> {
        if let Ok(pair) = signature::Ed25519KeyPair::from_pkcs8(der) {
            let public = PublicKey {
                keytype: "ed25519".into(),
                scheme: "ed25519".into(),
                public: hex::encode(pair.public_key().as_ref()),
                material: Material::Ed25519(pair.public_key().as_ref().to_vec()),
            };
            return Ok(SigningKey { pair: Pair::Ed25519(pair), pkcs8: der.to_vec(), public });
        }
        let rng = ring::rand::SystemRandom::new();
        let pair = signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
            .map_err(|_| Error::Key("not an ed25519 or P-256 PKCS#8 key".into()))?;
        let point = pair.public_key().as_ref().to_vec();
        // SPKI = fixed prefix for id-ecPublicKey/prime256v1 + the 65-byte point.
        let mut spki = vec![0x30, 0x59, 0x30, 0x13, 0x06, 0x07];
        spki.extend_from_slice(OID_EC_PUBLIC_KEY);
        spki.extend_from_slice(&[0x06, 0x08]);
        spki.extend_from_slice(OID_P256);
        spki.extend_from_slice(&[0x03, 0x42, 0x00]);
        spki.extend_from_slice(&point);
        let public = PublicKey {
            keytype: "ecdsa".into(),
            scheme: "ecdsa-sha2-nistp256".into(),
            public: pem_encode("PUBLIC KEY", &spki),
            material: Material::EcdsaP256(point),
        };
        Ok(SigningKey { pair: Pair::Ecdsa(pair), pkcs8: der.to_vec(), public })
    }

    /// Loads a `-----BEGIN PRIVATE KEY-----` PEM file's contents.
    ///
    /// # Errors
    /// [`Error::Key`] if it is not a PKCS#8 PEM of a supported key.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        if !pem.contains(PEM_LABEL) {
            return Err(Error::Key("expected a PKCS#8 PEM private key".into()));
        }
        let der = spki_from_pem(pem).ok_or_else(|| Error::Key("bad PEM base64".into()))?;
        Self::from_pkcs8(&der)
    }

    /// The private key as PKCS#8 PEM (to be stored with 0600 permissions).
    pub fn to_pem(&self) -> String {
        pem_encode(PEM_LABEL, &self.pkcs8)
    }

    /// The matching public key.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `msg`.
    ///
    /// # Errors
    /// [`Error::Key`] if ECDSA signing fails (random source failure).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        match &self.pair {
            Pair::Ed25519(p) => Ok(p.sign(msg).as_ref().to_vec()),
            Pair::Ecdsa(p) => {
                let rng = ring::rand::SystemRandom::new();
                p.sign(&rng, msg).map(|s| s.as_ref().to_vec()).map_err(|_| Error::Key("ecdsa signing failed".into()))
            }
        }
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_both_kinds_and_reload() {
        for kind in [KeyKind::Ed25519, KeyKind::EcdsaP256] {
            let k = SigningKey::generate(kind).unwrap();
            let sig = k.sign(b"hello").unwrap();
            let reparsed = PublicKey::from_value(&k.public().to_value()).unwrap();
            assert!(reparsed.verify(b"hello", &sig));
            assert!(!reparsed.verify(b"hellO", &sig));
            let again = SigningKey::from_pem(&k.to_pem()).unwrap();
            assert_eq!(again.public(), k.public());
        }
    }

    #[test]
    fn ecdsa_key_given_as_hex_point_verifies() {
        let k = SigningKey::generate(KeyKind::EcdsaP256).unwrap();
        let point = spki_key(&spki_from_pem(&k.public().public).unwrap(), SpkiAlg::P256).unwrap();
        let v = json!({"keytype": "ecdsa-sha2-nistp256", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": hex::encode(&point)}});
        let sig = k.sign(b"m").unwrap();
        assert!(PublicKey::from_value(&v).unwrap().verify(b"m", &sig));
    }

    #[test]
    fn unknown_key_type_parses_but_never_verifies() {
        let v = json!({"keytype": "sphincs", "scheme": "x", "keyval": {"public": "00"}});
        let k = PublicKey::from_value(&v).unwrap();
        assert!(!k.verify(b"m", b"s"));
    }
}
