//! The `api_body` fuzz target on stable Rust: its seeds in
//! `fuzz/corpus/api_body/` are real request bodies (one per body kind, made
//! here; `HEARTH_BLESS=1` rewrites them), and every seed plus
//! deterministic mutations of it goes through
//! `hearth_cloud::fuzzing::api_body`, which must not panic.

use std::path::PathBuf;

use hearth_proto::keys::PublicKey;
use hearth_proto::pairing::{PendingPairing, SetupSecret};
use serde_json::json;

/// Mutations of the corpus per run: a few thousand keep this well under a second.
const MUTATIONS: usize = 4_000;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/api_body")
}

/// One valid body of each kind the API decodes.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ctl = hearth_proto::keys::generate();
    let secret = SetupSecret::random();
    let pending = PendingPairing::start(secret.clone(), &ctl);
    let bodies = [
        ("credentials", json!({"email": "a@example.com", "password": "correct horse battery staple"})),
        ("controller", json!({"public_key": PublicKey::from(&ctl), "name": "laptop"})),
        ("command", json!({"envelope": hearth_proto::b64::encode(b"not an envelope but base64url")})),
        ("pair", json!({"code_lookup": secret.lookup(), "name": "plug", "request": pending.request()})),
    ];
    bodies.into_iter().map(|(n, v)| (n, serde_json::to_vec(&v).unwrap())).collect()
}

/// Marsaglia's xorshift64: deterministic, no dependency.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// Byte flips, JSON-ish insertions, deletions and splices from another seed.
fn mutate(rng: &mut XorShift, input: &[u8], other: &[u8]) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[b"{", b"}", b"[", b"\"", b"\\u0000", b"null", b"1e999", b"-0", b",", b":", b"\xff"];
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let pos = rng.below(out.len() + 1);
        match rng.below(4) {
            0 if !out.is_empty() => {
                let at = pos.min(out.len() - 1);
                out[at] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                out.splice(pos..pos, t.iter().copied());
            }
            2 => {
                let end = (pos + rng.below(8)).min(out.len());
                out.drain(pos..end);
            }
            _ => {
                let from = rng.below(other.len() + 1);
                let end = (from + rng.below(16)).min(other.len());
                out.splice(pos..pos, other[from..end].iter().copied());
            }
        }
    }
    out
}

#[test]
fn api_body_seeds_are_real_bodies_and_mutations_never_panic() {
    let dir = corpus_dir();
    if std::env::var_os("HEARTH_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in seeds() {
            std::fs::write(dir.join(name), body).unwrap();
        }
    }
    // Fresh seeds (new keys) and the committed corpus, which may also hold
    // inputs a fuzzing run found and someone kept.
    let mut corpus: Vec<Vec<u8>> = seeds().into_iter().map(|(_, b)| b).collect();
    let mut committed = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/api_body (HEARTH_BLESS=1 writes it)") {
        corpus.push(std::fs::read(entry.unwrap().path()).unwrap());
        committed += 1;
    }
    assert!(committed >= 4, "the committed seeds are missing");
    for (name, body) in seeds() {
        assert_eq!(hearth_cloud::fuzzing::api_body(&body), 1, "the {name} seed is not exactly one body kind");
    }
    let mut rng = XorShift(0x5eed_0a91_b0d1_e5f7);
    for _ in 0..MUTATIONS {
        let a = &corpus[rng.below(corpus.len())];
        let b = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, a, b);
        // A panic fails the test with the input in the message.
        let r = std::panic::catch_unwind(|| hearth_cloud::fuzzing::api_body(&input));
        assert!(r.is_ok(), "api_body panicked on {:?}", String::from_utf8_lossy(&input));
    }
}
