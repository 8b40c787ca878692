//! Deterministic randomness for away mode and the load simulator.
//!
//! Away mode must look random to someone watching the house, but the device
//! must be able to recompute a day's plan after a reboot without storing it,
//! and tests must be reproducible. So randomness is a seeded generator: the
//! seed is drawn once from the device's CSPRNG when the rule is created and
//! stored in the rule; a day's plan is a pure function of (seed, date).

/// SplitMix64 (Steele, Lea, Flood: "Fast splittable pseudorandom number
/// generators", OOPSLA 2014). Not cryptographic, and it need not be: it only
/// decides when lamps go on.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `lo..=hi` (inclusive). The modulo bias is below 2^-40 for
    /// the small ranges used here, which does not matter for lamp timings.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        let span = u64::from(hi - lo) + 1;
        lo + (self.next_u64() % span) as u32
    }

    /// A float in `[0, 1)` built from the top 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
