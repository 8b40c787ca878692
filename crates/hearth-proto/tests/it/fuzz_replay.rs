//! The fuzz targets on stable Rust: every entry point in
//! `hearth_proto::fuzzing` runs over every file in `fuzz/corpus/` (seeds,
//! and anything a fuzzing run added or `fuzz/artifacts/` crash files copied
//! there) plus deterministic mutations of them. cargo-fuzz needs nightly;
//! this keeps the entry points honest in every `cargo test`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use hearth_proto::fuzzing::TARGETS;

use crate::repo_root;

/// Mutations per target. Enough to walk every mutation kind over every
/// seed many times while keeping the test a few seconds long.
const MUTATIONS_PER_TARGET: usize = 2_000;

/// Marsaglia's xorshift64: deterministic, seedable, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Applies one to four random edits of the kinds libFuzzer also makes.
fn mutate(rng: &mut XorShift, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let pos = rng.below(out.len() + 1);
        // The byte at or before `pos`, for edits that need an existing byte.
        let at = pos.min(out.len().saturating_sub(1));
        match rng.below(8) {
            // Flip one bit.
            0 if !out.is_empty() => out[at] ^= 1 << rng.below(8),
            // Overwrite a byte with a boundary value CBOR and JSON care about.
            1 if !out.is_empty() => {
                const INTERESTING: [u8; 10] = [0x00, 0xff, 0x7f, 0x80, 0x18, 0x1b, 0x9f, 0xbf, b'"', b'\\'];
                out[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            // Truncate.
            2 => out.truncate(pos),
            // Insert random bytes.
            3 => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(pos..pos, bytes);
            }
            // Delete a run.
            4 if pos < out.len() => {
                let end = (pos + 1 + rng.below(16)).min(out.len());
                out.drain(pos..end);
            }
            // Duplicate a run (repeated headers, repeated map keys).
            5 if pos < out.len() => {
                let end = (pos + 1 + rng.below(32)).min(out.len());
                let run = out[pos..end].to_vec();
                out.splice(pos..pos, run);
            }
            // Splice in part of another seed of the same target.
            6 if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = start + rng.below(other.len() - start + 1);
                out.splice(pos..pos, other[start..end].iter().copied());
            }
            // Set a 4-byte run to a big-endian length (frame headers, CBOR lengths).
            _ => {
                let len = [0u32, 1, 4, 0xffff, 0x1_0000, 0x1_0001, u32::MAX][rng.below(7)].to_be_bytes();
                let end = (pos + 4).min(out.len());
                out.splice(pos..end, len);
            }
        }
    }
    out
}

fn read_corpus(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    // Sorted so the mutation sequence does not depend on directory order.
    files.sort();
    files.into_iter().map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect()
}

/// Runs one input, turning a panic into a message that reproduces it.
fn run(target: &str, f: hearth_proto::fuzzing::EntryPoint, what: &str, input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| f(input))).map_err(|e| {
        let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
        format!("{target} panicked on {what}: {}\n  input hex: {}", msg.unwrap_or_default(), hex::encode(input))
    })
}

#[test]
fn fuzz_targets_survive_corpus_and_mutations() {
    let mut failures = Vec::new();
    let mut runs = 0usize;
    for (i, (target, f)) in TARGETS.iter().enumerate() {
        let corpus = read_corpus(&repo_root().join("fuzz/corpus").join(target));
        assert!(!corpus.is_empty(), "fuzz/corpus/{target} is empty");
        for (name, bytes) in &corpus {
            failures.extend(run(target, *f, &format!("seed {name}"), bytes).err());
            runs += 1;
        }
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
        for n in 0..MUTATIONS_PER_TARGET {
            let (name, seed) = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())].1;
            let input = mutate(&mut rng, seed, other);
            failures.extend(run(target, *f, &format!("mutation {n} of {name}"), &input).err());
            runs += 1;
        }
    }
    assert!(failures.is_empty(), "{} of {runs} runs panicked:\n{}", failures.len(), failures.join("\n"));
}

/// A few inputs every decoder must survive regardless of the corpus.
#[test]
fn fuzz_targets_survive_edge_inputs() {
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        vec![0xd2],
        vec![0xff; 4],
        vec![0; 4],
        // Tag 18 around an indefinite-length array that never ends.
        vec![0xd2, 0x9f],
        // CBOR byte string claiming 2^63 bytes.
        vec![0xd2, 0x84, 0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0],
        // CBOR map claiming 2^32 entries.
        vec![0xba, 0xff, 0xff, 0xff, 0xff],
        // Deeply nested arrays.
        vec![0x81; 10_000],
        // Deeply nested JSON.
        [b"[".repeat(10_000), b"]".repeat(10_000)].concat(),
        // A frame header announcing exactly the limit, with no body.
        (hearth_proto::MAX_FRAME_LEN as u32).to_be_bytes().to_vec(),
        vec![b'A'; hearth_proto::MAX_FRAME_LEN + 1],
    ];
    inputs.push("HEARTH:1:".repeat(100).into_bytes());
    inputs.push("é".repeat(26).into_bytes());
    let mut failures = Vec::new();
    for (target, f) in TARGETS {
        for (i, input) in inputs.iter().enumerate() {
            failures.extend(run(target, *f, &format!("edge input {i}"), input).err());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
