//! The hardware behind the device core (issue 5: "simulated hardware
//! behind a driver trait, so a GPIO/real driver can be added").
//!
//! [`crate::DeviceCore`] decides what the outputs should be and calls
//! [`Driver::apply`] after every change it has saved, and once at boot, so
//! the hardware always follows the persisted state (never the other way
//! round: a crash between the save and the call is healed by the boot
//! call). The simulator's [`Simulated`] driver keeps the level in memory
//! and models a linear fade; a GPIO driver would set a relay pin and a PWM
//! duty cycle, and read a metering chip for [`Driver::power_mw`]. Without
//! a reading the core uses its simulated load.

use std::sync::{Arc, Mutex};

/// What the outputs should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// Relay (or lamp) on.
    pub on: bool,
    /// Brightness in percent while on, for dimmers; `None` on a relay.
    pub brightness: Option<u8>,
    /// Time to reach the new level, milliseconds (0: at once).
    pub fade_ms: u32,
}

/// A device's outputs.
pub trait Driver: Send + Sync {
    /// Drives the outputs to `output`, starting at `now_ms` (unix
    /// milliseconds). Must not block for the fade: a real driver ramps in
    /// the background (a PWM timer), the simulator computes the level.
    fn apply(&mut self, output: Output, now_ms: u64);

    /// The power the load draws now, in milliwatts, from a metering chip;
    /// `None` when the hardware has no meter (or the simulator decides
    /// the load, see `DeviceCore::set_load_profile`). Called once per tick.
    fn power_mw(&mut self, now_ms: u64) -> Option<u64> {
        let _ = now_ms;
        None
    }
}

/// The simulator's driver: remembers the last output and when it was
/// applied, and computes the light level during a fade. Cloning shares
/// the state, so a test can watch what the core drove.
#[derive(Debug, Clone, Default)]
pub struct Simulated {
    inner: Arc<Mutex<SimState>>,
}

#[derive(Debug, Default)]
struct SimState {
    /// Every output applied, with its start time (bounded: the last 1,000).
    applied: Vec<(u64, Output)>,
    /// The level (0–100 %) when the current fade started.
    from_level: f32,
}

/// Outputs the simulator remembers.
const SIM_HISTORY: usize = 1_000;

fn target_level(o: &Output) -> f32 {
    match (o.on, o.brightness) {
        (false, _) => 0.0,
        (true, Some(b)) => f32::from(b),
        (true, None) => 100.0,
    }
}

impl Simulated {
    /// A simulated output, off.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // The state is plain data; a panic elsewhere cannot leave it torn.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outputs applied so far, oldest first, with their start times.
    pub fn applied(&self) -> Vec<(u64, Output)> {
        self.lock().applied.clone()
    }

    /// The light level in percent at `now_ms` (0 when off), following the
    /// last output's linear fade from the level it started at.
    pub fn level_at(&self, now_ms: u64) -> f32 {
        let s = self.lock();
        let Some((start, out)) = s.applied.last() else { return 0.0 };
        level(s.from_level, *start, out, now_ms)
    }
}

fn level(from: f32, start: u64, out: &Output, now_ms: u64) -> f32 {
    let to = target_level(out);
    if out.fade_ms == 0 || now_ms >= start.saturating_add(u64::from(out.fade_ms)) {
        return to;
    }
    let done = now_ms.saturating_sub(start) as f32 / out.fade_ms as f32;
    from + (to - from) * done
}

impl Driver for Simulated {
    fn apply(&mut self, output: Output, now_ms: u64) {
        let mut s = self.lock();
        // A new fade starts from wherever the previous one had got to.
        s.from_level = match s.applied.last() {
            Some((start, prev)) => level(s.from_level, *start, prev, now_ms),
            None => 0.0,
        };
        if s.applied.len() >= SIM_HISTORY {
            s.applied.remove(0);
        }
        s.applied.push((now_ms, output));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fade_is_linear_and_a_new_one_starts_where_the_last_one_got_to() {
        let mut d = Simulated::new();
        assert_eq!(d.level_at(0), 0.0);
        d.apply(Output { on: true, brightness: Some(80), fade_ms: 2_000 }, 10_000);
        assert_eq!(d.level_at(10_000), 0.0);
        assert_eq!(d.level_at(11_000), 40.0);
        assert_eq!(d.level_at(12_000), 80.0);
        assert_eq!(d.level_at(99_000), 80.0);
        // Dimmed to 20 % over 1 s, interrupted halfway by "off" at once.
        d.apply(Output { on: true, brightness: Some(20), fade_ms: 1_000 }, 20_000);
        assert_eq!(d.level_at(20_500), 50.0);
        d.apply(Output { on: false, brightness: Some(20), fade_ms: 0 }, 20_500);
        assert_eq!(d.level_at(20_500), 0.0);
        // On again, fading up from 0, not from the stale 50 %.
        d.apply(Output { on: true, brightness: Some(20), fade_ms: 1_000 }, 30_000);
        assert_eq!(d.level_at(30_500), 10.0);
        assert_eq!(d.applied().len(), 4);
        // A relay without brightness is 0 or 100.
        let mut r = Simulated::new();
        r.apply(Output { on: true, brightness: None, fade_ms: 0 }, 1);
        assert_eq!(r.level_at(1), 100.0);
    }
}
