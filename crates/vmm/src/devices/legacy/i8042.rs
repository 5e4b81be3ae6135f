//! The i8042 keyboard controller, reduced to what a guest uses it for: resetting the machine
//! (`outb 0xfe, 0x64`, Linux's `reboot=k`). A reset ends the VM.

use vm_superio::Trigger;

use crate::devices::bus::BusDevice;

pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

/// Called on the vCPU thread when the guest resets the machine.
pub struct ResetTrigger(pub Box<dyn Fn() + Send>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

pub struct I8042(vm_superio::I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        I8042(vm_superio::I8042Device::new(ResetTrigger(on_reset)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data {
            let Ok(()) = self.0.write(offset as u8, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_command_0xfe_on_port_0x64_resets() {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        let mut dev = I8042::new(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfd]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }
}
