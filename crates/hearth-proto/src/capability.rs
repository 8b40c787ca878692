//! What a device is and what it can do.

use serde::{Deserialize, Serialize};

/// The hardware a device agent drives (or simulates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A smart plug or wall switch with one relay.
    Plug,
    /// A plug with a relay and a power meter (WeMo Insight class).
    EnergyPlug,
    /// A passive-infrared motion sensor.
    MotionSensor,
    /// A dimmable light.
    Dimmer,
}

/// One thing a device can do; a command names the capability it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Relay on/off.
    Switch,
    /// Brightness 1–100 %.
    Dimmer,
    /// Reports motion events.
    Motion,
    /// Reports power and energy.
    EnergyMeter,
}

impl DeviceKind {
    /// The capabilities this kind of device has.
    pub fn capabilities(self) -> &'static [Capability] {
        match self {
            DeviceKind::Plug => &[Capability::Switch],
            DeviceKind::EnergyPlug => &[Capability::Switch, Capability::EnergyMeter],
            DeviceKind::MotionSensor => &[Capability::Motion],
            DeviceKind::Dimmer => &[Capability::Switch, Capability::Dimmer],
        }
    }

    /// Whether the device has the capability.
    pub fn has(self, cap: Capability) -> bool {
        self.capabilities().contains(&cap)
    }

    /// The name used on the command line and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Plug => "plug",
            DeviceKind::EnergyPlug => "energy_plug",
            DeviceKind::MotionSensor => "motion_sensor",
            DeviceKind::Dimmer => "dimmer",
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, crate::Error> {
        match s.replace('-', "_").as_str() {
            "plug" => Ok(DeviceKind::Plug),
            "energy_plug" => Ok(DeviceKind::EnergyPlug),
            "motion_sensor" => Ok(DeviceKind::MotionSensor),
            "dimmer" => Ok(DeviceKind::Dimmer),
            other => Err(crate::error::malformed(
                "device kind",
                format!("{other:?} is not one of plug, energy-plug, motion-sensor, dimmer"),
            )),
        }
    }
}
