//! The 16550 UART at 0x3f8 (vm-superio), its interrupt delivered through an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::state::{Persist, StateError};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises a guest interrupt by writing to an eventfd that KVM routes to a GSI.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct Serial(vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>);

/// The UART registers and receive FIFO, as a snapshot keeps them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SerialState {
    pub registers: [u8; 10],
    pub in_buffer: Vec<u8>,
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial(vm_superio::Serial::new(IrqTrigger(irq), out))
    }
}

impl Persist for Serial {
    type State = SerialState;
    type Error = StateError;

    fn save(&self) -> Result<SerialState, StateError> {
        let s = self.0.state();
        Ok(SerialState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
                0,
            ],
            in_buffer: s.in_buffer,
        })
    }

    /// vm-superio builds a UART from a state only: the fresh one's interrupt and output move
    /// into the rebuilt one.
    fn restore(&mut self, state: &SerialState) -> Result<(), StateError> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch, _] =
            state.registers;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let share = |e: std::io::Error| StateError::new("serial", format!("cannot share its interrupt eventfd: {e}"));
        let irq = self.0.interrupt_evt().0.try_clone().map_err(share)?;
        let spare = IrqTrigger(irq.try_clone().map_err(share)?);
        let out =
            std::mem::replace(&mut self.0, vm_superio::Serial::new(spare, Box::new(std::io::sink()))).into_writer();
        self.0 = vm_superio::Serial::from_state(&s, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| StateError::new("serial", format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [byte] = data {
            *byte = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data {
            // A console that cannot be written (full disk, closed reader) must not stop the guest.
            if let Err(e) = self.0.write(offset as u8, *byte) {
                tracing::warn!("serial output dropped: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A buffer both the test and the UART write side can see.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_restored_uart_has_the_saved_registers_and_keeps_its_output() {
        let mut a = Serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(std::io::sink()));
        a.write(7, &[0x5a]); // scratch
        a.write(3, &[0x03]); // line control: 8 bits
        a.write(1, &[0x01]); // interrupt enable: received data
        let saved = a.save().unwrap();
        let out = Shared::default();
        let mut b = Serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(out.clone()));
        b.restore(&saved).unwrap();
        assert_eq!(b.save().unwrap().registers, saved.registers);
        let mut scratch = [0];
        b.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        b.write(0, b"x");
        assert_eq!(*out.0.lock().unwrap(), b"x", "the fresh UART's output goes on");
    }
}
