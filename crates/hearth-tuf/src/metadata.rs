//! TUF metadata (spec 4): the signed envelope, the four top-level roles and
//! delegated targets, parsed into checked types at the edge.
//!
//! Unknown fields are tolerated (spec 4: metadata may be extended) and stay
//! covered by the signature because signatures are checked over the
//! canonical form of the `signed` object exactly as received.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::crypto::PublicKey;
use crate::{canonical, time, Error};

/// Names of the four top-level roles.
pub const TOP_LEVEL: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];

/// A signature from the envelope's `signatures` list.
#[derive(Clone, Debug)]
pub struct Signature {
    /// Key id the signer claims.
    pub keyid: String,
    /// Raw signature bytes (hex in JSON).
    pub sig: Vec<u8>,
}

/// `{"signed": …, "signatures": […]}` before the signatures are checked.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The `signed` object.
    pub signed: Value,
    /// Canonical JSON of `signed`: the bytes the signatures cover.
    pub signed_bytes: Vec<u8>,
    /// The signatures.
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// Parses an envelope; `role` names it in errors.
    ///
    /// # Errors
    /// [`Error::Malformed`] for bad JSON, a missing part, or two signatures
    /// claiming the same key id (ambiguous which one counts).
    pub fn parse(role: &str, bytes: &[u8]) -> Result<Self, Error> {
        let mut v: Value = serde_json::from_slice(bytes).map_err(|e| Error::malformed(role, e.to_string()))?;
        let obj = v.as_object_mut().ok_or_else(|| Error::malformed(role, "not an object"))?;
        let signed = obj.remove("signed").filter(Value::is_object).ok_or_else(|| Error::malformed(role, "missing signed object"))?;
        let sigs = obj.get("signatures").and_then(Value::as_array).ok_or_else(|| Error::malformed(role, "missing signatures list"))?;
        let mut signatures: Vec<Signature> = Vec::with_capacity(sigs.len());
        for s in sigs {
            let keyid = str_field(role, s, "keyid")?;
            let sig = hex::decode(str_field(role, s, "sig")?).map_err(|_| Error::malformed(role, "signature is not hex"))?;
            if signatures.iter().any(|o| o.keyid == keyid) {
                return Err(Error::malformed(role, format!("two signatures for key {keyid}")));
            }
            signatures.push(Signature { keyid, sig });
        }
        let signed_bytes = canonical::encode(&signed)?;
        Ok(Envelope { signed, signed_bytes, signatures })
    }
}

/// Keys and threshold of one role (root's `roles` entries; spec 4.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleKeys {
    /// Key ids allowed to sign.
    pub keyids: Vec<String>,
    /// Number of distinct valid signatures needed.
    pub threshold: u64,
}

impl RoleKeys {
    fn parse(role: &str, v: &Value) -> Result<Self, Error> {
        let keyids = str_list(role, v, "keyids")?;
        let mut sorted = keyids.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != keyids.len() {
            return Err(Error::malformed(role, "duplicate key ids"));
        }
        let threshold = v.get("threshold").and_then(Value::as_u64).filter(|t| *t >= 1).ok_or_else(|| Error::malformed(role, "threshold must be an integer >= 1"))?;
        Ok(RoleKeys { keyids, threshold })
    }
}

/// Checks that `env` carries `threshold` valid signatures by distinct keys
/// of `role` (spec 5.3.3, 5.4.2, 5.5.3, 5.6.3: "signed by a threshold of
/// keys"). Distinct means distinct key material: one key listed under two
/// ids counts once.
///
/// # Errors
/// [`Error::Threshold`] when too few verify.
pub fn verify_threshold(name: &str, keys: &BTreeMap<String, PublicKey>, role: &RoleKeys, env: &Envelope) -> Result<(), Error> {
    let mut counted: Vec<&[u8]> = Vec::new();
    for keyid in &role.keyids {
        let (Some(key), Some(sig)) = (keys.get(keyid), env.signatures.iter().find(|s| &s.keyid == keyid)) else { continue };
        if !key.verify(&env.signed_bytes, &sig.sig) {
            continue;
        }
        if let Some(material) = key.material_bytes() {
            if !counted.contains(&material) {
                counted.push(material);
            }
        }
    }
    let valid = counted.len();
    if (valid as u64) < role.threshold {
        return Err(Error::Threshold { role: name.to_owned(), valid, threshold: role.threshold });
    }
    Ok(())
}

/// Fields every role has (spec 4.2).
#[derive(Clone, Debug)]
pub struct Common {
    /// Version, > 0.
    pub version: u64,
    /// Expiry, Unix seconds.
    pub expires: i64,
    /// Expiry as written.
    pub expires_str: String,
    /// `spec_version` as written.
    pub spec_version: String,
}

impl Common {
    fn parse(role: &str, expected_type: &str, v: &Value) -> Result<Self, Error> {
        let ty = str_field(role, v, "_type")?;
        if ty != expected_type {
            return Err(Error::malformed(role, format!("_type is {ty:?}, expected {expected_type:?}")));
        }
        let spec_version = str_field(role, v, "spec_version")?;
        let parts: Vec<&str> = spec_version.split('.').collect();
        // Only TUF 1.x is understood; a 2.x repository is refused rather than
        // misread (spec 4.2 "spec_version").
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) || parts[0] != "1" {
            return Err(Error::malformed(role, format!("unsupported spec_version {spec_version:?}")));
        }
        let version = v.get("version").and_then(Value::as_u64).filter(|n| *n >= 1).ok_or_else(|| Error::malformed(role, "version must be an integer >= 1"))?;
        let expires_str = str_field(role, v, "expires")?;
        let expires = time::parse(&expires_str).ok_or_else(|| Error::malformed(role, format!("bad expires {expires_str:?}")))?;
        Ok(Common { version, expires, expires_str, spec_version })
    }

    /// True if expired at `now` (spec: "expired" means now >= expires).
    pub fn is_expired(&self, now: i64) -> bool {
        now >= self.expires
    }
}

/// Root metadata (spec 4.3).
#[derive(Clone, Debug)]
pub struct Root {
    /// Common fields.
    pub common: Common,
    /// Whether the repository uses consistent snapshots.
    pub consistent_snapshot: bool,
    /// Keys by id.
    pub keys: BTreeMap<String, PublicKey>,
    /// Exactly the four top-level roles.
    pub roles: BTreeMap<String, RoleKeys>,
}

impl Root {
    /// Parses root's `signed` object.
    ///
    /// # Errors
    /// [`Error::Malformed`] on any format violation.
    pub fn parse(v: &Value) -> Result<Self, Error> {
        let common = Common::parse("root", "root", v)?;
        let consistent_snapshot = match v.get("consistent_snapshot") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(Error::malformed("root", "consistent_snapshot is not a bool")),
        };
        let keys = parse_keys("root", v)?;
        let roles_obj = obj_field("root", v, "roles")?;
        let mut roles = BTreeMap::new();
        for (name, r) in roles_obj {
            roles.insert(name.clone(), RoleKeys::parse("root", r)?);
        }
        if roles.len() != 4 || !TOP_LEVEL.iter().all(|r| roles.contains_key(*r)) {
            return Err(Error::malformed("root", "roles must be exactly root, timestamp, snapshot, targets"));
        }
        Ok(Root { common, consistent_snapshot, keys, roles })
    }

    /// Verifies `env` as signed by top-level role `role` of this root.
    ///
    /// # Errors
    /// [`Error::Threshold`] if too few valid signatures.
    pub fn verify_role(&self, role: &str, env: &Envelope) -> Result<(), Error> {
        let keys = self.roles.get(role).ok_or_else(|| Error::Missing(format!("root has no role {role}")))?;
        verify_threshold(role, &self.keys, keys, env)
    }
}

/// A `meta` entry of timestamp or snapshot (spec 4.4 METAFILES).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaFile {
    /// Version of the referenced metadata.
    pub version: u64,
    /// Optional exact length.
    pub length: Option<u64>,
    /// Optional hashes (algorithm → digest).
    pub hashes: Option<BTreeMap<String, Vec<u8>>>,
}

impl MetaFile {
    fn parse(role: &str, v: &Value) -> Result<Self, Error> {
        let version = v.get("version").and_then(Value::as_u64).filter(|n| *n >= 1).ok_or_else(|| Error::malformed(role, "meta version must be an integer >= 1"))?;
        let length = match v.get("length") {
            None => None,
            Some(l) => Some(l.as_u64().ok_or_else(|| Error::malformed(role, "meta length must be a non-negative integer"))?),
        };
        let hashes = match v.get("hashes") {
            None => None,
            Some(h) => Some(parse_hashes(role, h)?),
        };
        Ok(MetaFile { version, length, hashes })
    }

    /// Checks `data` against the optional length and hashes.
    ///
    /// # Errors
    /// [`Error::LengthOrHash`] on mismatch or an unknown hash algorithm.
    pub fn verify(&self, what: &str, data: &[u8]) -> Result<(), Error> {
        if let Some(len) = self.length {
            check_length(what, len, data)?;
        }
        if let Some(h) = &self.hashes {
            check_hashes(what, h, data)?;
        }
        Ok(())
    }
}

/// Timestamp metadata (spec 4.6).
#[derive(Clone, Debug)]
pub struct Timestamp {
    /// Common fields.
    pub common: Common,
    /// The `snapshot.json` entry.
    pub snapshot_meta: MetaFile,
}

impl Timestamp {
    /// Parses timestamp's `signed` object.
    ///
    /// # Errors
    /// [`Error::Malformed`] on any format violation.
    pub fn parse(v: &Value) -> Result<Self, Error> {
        let common = Common::parse("timestamp", "timestamp", v)?;
        let meta = obj_field("timestamp", v, "meta")?;
        let entry = meta.get("snapshot.json").filter(|_| meta.len() == 1).ok_or_else(|| Error::malformed("timestamp", "meta must hold exactly snapshot.json"))?;
        Ok(Timestamp { common, snapshot_meta: MetaFile::parse("timestamp", entry)? })
    }
}

/// Snapshot metadata (spec 4.4).
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Common fields.
    pub common: Common,
    /// `<role>.json` → versions (and optionally lengths/hashes).
    pub meta: BTreeMap<String, MetaFile>,
}

impl Snapshot {
    /// Parses snapshot's `signed` object.
    ///
    /// # Errors
    /// [`Error::Malformed`] on any format violation.
    pub fn parse(v: &Value) -> Result<Self, Error> {
        let common = Common::parse("snapshot", "snapshot", v)?;
        let mut meta = BTreeMap::new();
        for (name, entry) in obj_field("snapshot", v, "meta")? {
            meta.insert(name.clone(), MetaFile::parse("snapshot", entry)?);
        }
        Ok(Snapshot { common, meta })
    }
}

/// One target (spec 4.5 TARGETS).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetFile {
    /// Target path.
    pub path: String,
    /// Exact length in bytes.
    pub length: u64,
    /// Hashes, at least one; all listed must match.
    pub hashes: BTreeMap<String, Vec<u8>>,
    /// The algorithm listed first in the metadata (consistent-snapshot file names use it).
    pub first_hash: String,
    /// Custom metadata (Hearth: version, hardware model).
    pub custom: Option<Value>,
}

impl TargetFile {
    fn parse(path: &str, v: &Value) -> Result<Self, Error> {
        let length = v.get("length").and_then(Value::as_u64).ok_or_else(|| Error::malformed("targets", format!("{path}: length")))?;
        let hv = v.get("hashes").ok_or_else(|| Error::malformed("targets", format!("{path}: hashes")))?;
        let hashes = parse_hashes("targets", hv)?;
        let first_hash = hv.as_object().and_then(|m| m.keys().next()).cloned().unwrap_or_default();
        Ok(TargetFile { path: path.to_owned(), length, hashes, first_hash, custom: v.get("custom").cloned() })
    }

    /// Checks a downloaded target (spec 5.7.2: length and hashes).
    ///
    /// # Errors
    /// [`Error::LengthOrHash`] on mismatch.
    pub fn verify(&self, data: &[u8]) -> Result<(), Error> {
        check_length(&self.path, self.length, data)?;
        check_hashes(&self.path, &self.hashes, data)
    }
}

/// Checks a target while it streams to `inner` (spec 5.7.2 without holding
/// the image in memory): counts and hashes every byte written, refuses
/// bytes past the trusted length, and [`VerifyingWriter::finish`] compares
/// length and every listed hash. Until `finish` succeeds the bytes written
/// must be treated as untrusted.
pub struct VerifyingWriter<W> {
    inner: W,
    what: String,
    expected_len: u64,
    written: u64,
    hashes: Vec<(String, ring::digest::Context, Vec<u8>)>,
}

impl<W: std::io::Write> VerifyingWriter<W> {
    /// Starts verifying `target` into `inner`.
    ///
    /// # Errors
    /// [`Error::LengthOrHash`] if a listed hash algorithm is unsupported.
    pub fn new(target: &TargetFile, inner: W) -> Result<Self, Error> {
        let hashes = target
            .hashes
            .iter()
            .map(|(alg, want)| Ok((alg.clone(), ring::digest::Context::new(hash_algorithm(&target.path, alg)?), want.clone())))
            .collect::<Result<_, Error>>()?;
        Ok(VerifyingWriter { inner, what: target.path.clone(), expected_len: target.length, written: 0, hashes })
    }

    /// Checks length and hashes; returns the inner writer on success.
    ///
    /// # Errors
    /// [`Error::LengthOrHash`] on mismatch.
    pub fn finish(mut self) -> Result<W, Error> {
        if self.written != self.expected_len {
            return Err(Error::LengthOrHash { what: self.what, reason: format!("length {} != {}", self.written, self.expected_len) });
        }
        for (alg, ctx, want) in self.hashes.drain(..) {
            if ctx.finish().as_ref() != want.as_slice() {
                return Err(Error::LengthOrHash { what: self.what, reason: format!("{alg} mismatch") });
            }
        }
        Ok(self.inner)
    }
}

impl<W: std::io::Write> std::io::Write for VerifyingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.expected_len {
            return Err(std::io::Error::other(format!("{}: more than the trusted {} bytes", self.what, self.expected_len)));
        }
        let n = self.inner.write(buf)?;
        for (_, ctx, _) in &mut self.hashes {
            ctx.update(&buf[..n]);
        }
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A delegated role entry (spec 4.5 "delegations").
#[derive(Clone, Debug)]
pub struct DelegatedRole {
    /// Role name.
    pub name: String,
    /// Keys and threshold.
    pub keys: RoleKeys,
    /// If true, the search stops here for matching paths (spec 5.6.7.2, "terminating delegation").
    pub terminating: bool,
    /// Shell-style path patterns, `*` not crossing `/`.
    pub paths: Option<Vec<String>>,
    /// Hex prefixes of SHA-256(target path).
    pub path_hash_prefixes: Option<Vec<String>>,
}

impl DelegatedRole {
    /// Whether `target` is delegated to this role.
    pub fn matches(&self, target: &str) -> bool {
        if let Some(paths) = &self.paths {
            return paths.iter().any(|p| path_matches(p, target));
        }
        if let Some(prefixes) = &self.path_hash_prefixes {
            let h = hex::encode(ring::digest::digest(&ring::digest::SHA256, target.as_bytes()));
            return prefixes.iter().any(|p| h.starts_with(p.as_str()));
        }
        false
    }
}

/// `delegations` of a targets role.
#[derive(Clone, Debug, Default)]
pub struct Delegations {
    /// Keys by id.
    pub keys: BTreeMap<String, PublicKey>,
    /// Roles in order of trust.
    pub roles: Vec<DelegatedRole>,
    /// TAP 15 hash-bin delegation, exclusive with `roles`.
    pub succinct: Option<SuccinctRoles>,
}

impl Delegations {
    /// Keys and threshold for delegated role `name`, if delegated here.
    pub fn role_keys(&self, name: &str) -> Option<&RoleKeys> {
        if let Some(r) = self.roles.iter().find(|r| r.name == name) {
            return Some(&r.keys);
        }
        self.succinct.as_ref().filter(|s| s.is_bin(name)).map(|s| &s.keys)
    }

    /// Roles delegated `target`, in order, with their terminating flag
    /// (spec 5.6.7.2; a succinct bin is always terminating, TAP 15).
    pub fn roles_for(&self, target: &str) -> Vec<(String, bool)> {
        if let Some(s) = &self.succinct {
            return vec![(s.bin_for(target), true)];
        }
        self.roles.iter().filter(|r| r.matches(target)).map(|r| (r.name.clone(), r.terminating)).collect()
    }
}

/// TAP 15 succinct hash-bin delegation: `2^bit_length` roles named
/// `<prefix>-<bin in hex>`, target → bin by the leading bits of SHA-256(path).
#[derive(Clone, Debug)]
pub struct SuccinctRoles {
    /// Keys and threshold shared by every bin.
    pub keys: RoleKeys,
    /// Number of leading hash bits (1..=32).
    pub bit_length: u32,
    /// Bin role name prefix.
    pub name_prefix: String,
}

impl SuccinctRoles {
    fn suffix_len(&self) -> usize {
        self.bit_length.div_ceil(4) as usize
    }

    /// The bin role responsible for `target`.
    pub fn bin_for(&self, target: &str) -> String {
        let h = ring::digest::digest(&ring::digest::SHA256, target.as_bytes());
        let first = u32::from_be_bytes([h.as_ref()[0], h.as_ref()[1], h.as_ref()[2], h.as_ref()[3]]);
        let bin = first >> (32 - self.bit_length);
        format!("{}-{:0width$x}", self.name_prefix, bin, width = self.suffix_len())
    }

    /// Whether `name` is one of the bins.
    pub fn is_bin(&self, name: &str) -> bool {
        let Some(suffix) = name.strip_prefix(&self.name_prefix).and_then(|s| s.strip_prefix('-')) else { return false };
        suffix.len() == self.suffix_len()
            && suffix.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && u64::from_str_radix(suffix, 16).is_ok_and(|n| n < 1u64 << self.bit_length)
    }
}

/// Targets metadata, top-level or delegated (spec 4.5).
#[derive(Clone, Debug)]
pub struct Targets {
    /// Common fields.
    pub common: Common,
    /// Targets by path.
    pub targets: BTreeMap<String, TargetFile>,
    /// Optional delegations.
    pub delegations: Option<Delegations>,
}

impl Targets {
    /// Parses a targets `signed` object; `role` names it in errors.
    ///
    /// # Errors
    /// [`Error::Malformed`] on any format violation.
    pub fn parse(role: &str, v: &Value) -> Result<Self, Error> {
        let common = Common::parse(role, "targets", v)?;
        let mut targets = BTreeMap::new();
        for (path, t) in obj_field(role, v, "targets")? {
            targets.insert(path.clone(), TargetFile::parse(path, t)?);
        }
        let delegations = match v.get("delegations") {
            None => None,
            Some(d) => {
                let keys = parse_keys(role, d)?;
                let succinct = match (d.get("succinct_roles"), d.get("roles")) {
                    (Some(_), Some(_)) => return Err(Error::malformed(role, "both roles and succinct_roles")),
                    (None, None) => return Err(Error::malformed(role, "delegations without roles")),
                    (Some(s), None) => {
                        let bit_length = s.get("bit_length").and_then(Value::as_u64).filter(|b| (1..=32).contains(b)).ok_or_else(|| Error::malformed(role, "succinct bit_length must be 1..=32"))?;
                        Some(SuccinctRoles { keys: RoleKeys::parse(role, s)?, bit_length: bit_length as u32, name_prefix: str_field(role, s, "name_prefix")? })
                    }
                    (None, Some(_)) => None,
                };
                let mut roles: Vec<DelegatedRole> = Vec::new();
                let role_list = match &succinct {
                    Some(_) => Vec::new(),
                    None => d.get("roles").and_then(Value::as_array).cloned().ok_or_else(|| Error::malformed(role, "delegations.roles"))?,
                };
                for r in &role_list {
                    let name = str_field(role, r, "name")?;
                    if TOP_LEVEL.contains(&name.as_str()) || roles.iter().any(|o| o.name == name) {
                        return Err(Error::malformed(role, format!("bad or duplicate delegated role name {name:?}")));
                    }
                    let paths = r.get("paths").map(|_| str_list(role, r, "paths")).transpose()?;
                    let path_hash_prefixes = r.get("path_hash_prefixes").map(|_| str_list(role, r, "path_hash_prefixes")).transpose()?;
                    if paths.is_some() && path_hash_prefixes.is_some() {
                        return Err(Error::malformed(role, format!("{name}: both paths and path_hash_prefixes")));
                    }
                    let terminating = r.get("terminating").and_then(Value::as_bool).ok_or_else(|| Error::malformed(role, format!("{name}: terminating")))?;
                    roles.push(DelegatedRole { keys: RoleKeys::parse(role, r)?, name, terminating, paths, path_hash_prefixes });
                }
                Some(Delegations { keys, roles, succinct })
            }
        };
        Ok(Targets { common, targets, delegations })
    }
}

/// Shell-style match of one delegation pattern against a target path:
/// both are split on `/` and must have the same number of parts; within a
/// part `*` matches any run, `?` one character, `[…]`/`[!…]` a class
/// (spec 4.5 "PATHPATTERN"; python-tuf uses fnmatch per part the same way).
pub fn path_matches(pattern: &str, target: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let t: Vec<&str> = target.split('/').collect();
    p.len() == t.len() && p.iter().zip(&t).all(|(p, t)| glob(&p.chars().collect::<Vec<_>>(), &t.chars().collect::<Vec<_>>()))
}

fn glob(p: &[char], t: &[char]) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some('*') => (0..=t.len()).any(|i| glob(&p[1..], &t[i..])),
        Some('?') => !t.is_empty() && glob(&p[1..], &t[1..]),
        Some('[') => {
            let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else {
                return t.first() == Some(&'[') && glob(&p[1..], &t[1..]);
            };
            let Some(&c) = t.first() else { return false };
            let (neg, class) = if p[1] == '!' { (true, &p[2..close]) } else { (false, &p[1..close]) };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != neg && glob(&p[close + 1..], &t[1..])
        }
        Some(&c) => t.first() == Some(&c) && glob(&p[1..], &t[1..]),
    }
}

fn check_length(what: &str, expected: u64, data: &[u8]) -> Result<(), Error> {
    if data.len() as u64 != expected {
        return Err(Error::LengthOrHash { what: what.to_owned(), reason: format!("length {} != {expected}", data.len()) });
    }
    Ok(())
}

fn hash_algorithm(what: &str, alg: &str) -> Result<&'static ring::digest::Algorithm, Error> {
    match alg {
        "sha256" => Ok(&ring::digest::SHA256),
        "sha384" => Ok(&ring::digest::SHA384),
        "sha512" => Ok(&ring::digest::SHA512),
        other => Err(Error::LengthOrHash { what: what.to_owned(), reason: format!("unsupported hash algorithm {other}") }),
    }
}

fn check_hashes(what: &str, hashes: &BTreeMap<String, Vec<u8>>, data: &[u8]) -> Result<(), Error> {
    for (alg, want) in hashes {
        let algorithm = hash_algorithm(what, alg)?;
        if ring::digest::digest(algorithm, data).as_ref() != want.as_slice() {
            return Err(Error::LengthOrHash { what: what.to_owned(), reason: format!("{alg} mismatch") });
        }
    }
    Ok(())
}

fn parse_hashes(role: &str, v: &Value) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    let obj = v.as_object().filter(|o| !o.is_empty()).ok_or_else(|| Error::malformed(role, "hashes must be a non-empty object"))?;
    obj.iter()
        .map(|(alg, h)| {
            let d = h.as_str().and_then(|s| hex::decode(s).ok()).ok_or_else(|| Error::malformed(role, format!("hash {alg} is not hex")))?;
            Ok((alg.clone(), d))
        })
        .collect()
}

fn parse_keys(role: &str, v: &Value) -> Result<BTreeMap<String, PublicKey>, Error> {
    obj_field(role, v, "keys")?.iter().map(|(id, k)| Ok((id.clone(), PublicKey::from_value(k)?))).collect()
}

fn str_field(role: &str, v: &Value, name: &str) -> Result<String, Error> {
    v.get(name).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| Error::malformed(role, format!("missing string {name}")))
}

fn obj_field<'a>(role: &str, v: &'a Value, name: &str) -> Result<&'a Map<String, Value>, Error> {
    v.get(name).and_then(Value::as_object).ok_or_else(|| Error::malformed(role, format!("missing object {name}")))
}

fn str_list(role: &str, v: &Value, name: &str) -> Result<Vec<String>, Error> {
    v.get(name)
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Error::malformed(role, format!("{name} must be a list of strings")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn succinct_bins_match_python_tuf() {
        // Expected names computed with python-tuf's SuccinctRoles.get_role_for_target.
        for (bits, expected) in [(1, ["bin-1", "bin-1", "bin-1"]), (3, ["bin-6", "bin-6", "bin-7"]), (8, ["bin-c2", "bin-ca", "bin-e3"]), (13, ["bin-1859", "bin-1952", "bin-1c76"])] {
            let s = SuccinctRoles { keys: RoleKeys { keyids: vec![], threshold: 1 }, bit_length: bits, name_prefix: "bin".into() };
            for (path, want) in ["fw/image.bin", "a", ""].iter().zip(expected) {
                assert_eq!(s.bin_for(path), want, "bits {bits} path {path:?}");
                assert!(s.is_bin(want));
            }
        }
        let s = SuccinctRoles { keys: RoleKeys { keyids: vec![], threshold: 1 }, bit_length: 3, name_prefix: "bin".into() };
        for not_bin in ["bin-8", "bin-06", "bin-A", "bins-1", "bin1", "other"] {
            assert!(!s.is_bin(not_bin), "{not_bin}");
        }
    }

    #[test]
    fn path_patterns() {
        for (p, t, want) in [
            ("*", "a", true),
            ("*", "a/b", false),
            ("a/*", "a/b", true),
            ("a/*.txt", "a/b.txt", true),
            ("a/*.txt", "a/b/c.txt", false),
            ("file?.bin", "file1.bin", true),
            ("file[0-3].bin", "file4.bin", false),
            ("file[!0-3].bin", "file4.bin", true),
            ("*/*", "x/y", true),
        ] {
            assert_eq!(path_matches(p, t), want, "{p} vs {t}");
        }
    }
}
