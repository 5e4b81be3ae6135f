//! The 16550 UART at 0x3f8 (vm-superio), its interrupt delivered through an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

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

    pub fn from_state(state: &SerialState, irq: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
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
        vm_superio::Serial::from_state(&s, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map(Serial)
            .map_err(|e| std::io::Error::other(format!("serial state: {e:?}")))
    }

    pub fn state(&self) -> SerialState {
        let s = self.0.state();
        SerialState {
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
        }
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
