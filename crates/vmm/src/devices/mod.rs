//! Devices and the buses that route guest accesses to them.

pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusDevice};
