//! The i8042 keyboard controller, reduced to what a guest without a keyboard uses it for:
//! resetting the machine (`outb 0xfe, 0x64`, Linux's `reboot=k`), and enough of the controller
//! protocol that Linux's driver probes it at once instead of waiting out its timeouts (each
//! unanswered command costs it ~0.5 s of boot: it polls the status register for a reply). It
//! answers the controller commands Linux sends (read/write the configuration byte, self-tests,
//! port enable/disable, output port) and has no keyboard or mouse behind it (the VMM's command
//! line says `i8042.noaux i8042.dumbkbd`, so nothing is written to the keyboard). A reset ends
//! the VM.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::devices::bus::BusDevice;
use crate::state::{Persist, StateError};

pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM: u8 = 1 << 2; // set after a passed self-test (always, here)
const STATUS_COMMAND: u8 = 1 << 3; // the last write went to the command port

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

// Configuration byte (CTR) bits.
const CTR_KBD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;

const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;
/// Output port: A20 on, not in reset.
const OUTPUT_PORT: u8 = 0x03;
/// Bytes the controller holds for the guest; more are dropped (a guest that never reads).
const OUTPUT_CAPACITY: usize = 16;

pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
    /// The configuration byte: translation on, system flag set, both ports' clocks off until
    /// the driver enables them.
    ctr: u8,
    status: u8,
    output: VecDeque<u8>,
    /// A command whose parameter byte comes next on the data port.
    awaiting: Option<u8>,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        I8042 {
            on_reset,
            ctr: 0x44 | CTR_KBD_DISABLED | CTR_AUX_DISABLED,
            status: STATUS_SYSTEM,
            output: VecDeque::new(),
            awaiting: None,
        }
    }

    fn reply(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.awaiting = Some(cmd),
            CMD_SELF_TEST => self.reply(SELF_TEST_PASSED),
            CMD_KBD_TEST | CMD_AUX_TEST => self.reply(PORT_TEST_PASSED),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            CMD_READ_OUTPUT_PORT => self.reply(OUTPUT_PORT),
            CMD_RESET_CPU => (self.on_reset)(),
            _ => {} // no keyboard, no mouse: everything else is ignored
        }
    }

    fn data(&mut self, byte: u8) {
        match self.awaiting.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(_) => {} // the output port: A20 is always on, reset goes through 0xfe
            None => {}    // a keyboard command: there is no keyboard (i8042.dumbkbd)
        }
    }
}

/// The controller as a snapshot keeps it: what the guest's driver wrote and has not read yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub ctr: u8,
    pub status: u8,
    pub output: Vec<u8>,
    pub awaiting: Option<u8>,
}

impl I8042State {
    /// Only states this controller can reach: at most its output capacity, known status bits,
    /// a pending parameter only for the commands that take one (a snapshot's is checked at load).
    pub fn check(&self) -> Result<(), StateError> {
        let invalid = |reason: String| Err(StateError::new("i8042", reason));
        if self.output.len() > OUTPUT_CAPACITY {
            return invalid(format!("{} output bytes (at most {OUTPUT_CAPACITY})", self.output.len()));
        }
        if self.status & !(STATUS_SYSTEM | STATUS_COMMAND) != 0 {
            return invalid(format!("status {:#04x} has bits this controller never sets", self.status));
        }
        if let Some(cmd) = self.awaiting.filter(|c| ![CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT].contains(c)) {
            return invalid(format!("command {cmd:#04x} takes no parameter byte"));
        }
        Ok(())
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type Error = StateError;

    fn save(&self) -> Result<I8042State, StateError> {
        Ok(I8042State {
            ctr: self.ctr,
            status: self.status,
            output: self.output.iter().copied().collect(),
            awaiting: self.awaiting,
        })
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        state.check()?;
        self.ctr = state.ctr;
        self.status = state.status;
        self.output = state.output.iter().copied().collect();
        self.awaiting = state.awaiting;
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            DATA => self.output.pop_front().unwrap_or(0),
            COMMAND => self.status | if self.output.is_empty() { 0 } else { STATUS_OUTPUT_FULL },
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = *data else { return };
        match offset {
            DATA => {
                self.status &= !STATUS_COMMAND;
                self.data(byte);
            }
            COMMAND => {
                self.status |= STATUS_COMMAND;
                self.command(byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn dev() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        (
            I8042::new(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })),
            resets,
        )
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn only_command_0xfe_on_port_0x64_resets() {
        let (mut dev, resets) = dev();
        dev.write(DATA, &[0xfe]);
        dev.write(COMMAND, &[0xfd]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(COMMAND, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn linux_probe_sequence_gets_its_answers() {
        let (mut dev, _) = dev();
        // Nothing to flush at first.
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        // Read the CTR: the reply is announced by the status register, then read from data.
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        let ctr = read(&mut dev, DATA);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_ne!(ctr & CTR_KBD_DISABLED, 0);
        // Write it back changed; read it again.
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), 0x47);
        // Enable the keyboard port: its disable bit clears.
        dev.write(COMMAND, &[CMD_KBD_ENABLE]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA) & CTR_KBD_DISABLED, 0);
        // Self-tests pass.
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_PASSED);
        dev.write(COMMAND, &[CMD_KBD_TEST]);
        assert_eq!(read(&mut dev, DATA), PORT_TEST_PASSED);
        assert_ne!(read(&mut dev, COMMAND) & STATUS_SYSTEM, 0);
    }

    #[test]
    fn a_restored_controller_answers_as_the_saved_one() {
        let (mut saved, _) = dev();
        saved.write(COMMAND, &[CMD_WRITE_CTR]);
        saved.write(DATA, &[0x47]);
        saved.write(COMMAND, &[CMD_SELF_TEST]);
        saved.write(COMMAND, &[CMD_WRITE_CTR]); // its parameter comes after the restore
        let state = saved.save().unwrap();
        let (mut restored, _) = dev();
        restored.restore(&state).unwrap();
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(read(&mut restored, DATA), SELF_TEST_PASSED, "the unread reply survives");
        restored.write(DATA, &[0x65]);
        restored.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut restored, DATA), 0x65, "the pending CTR write completes");
    }

    #[test]
    fn states_it_cannot_reach_are_refused() {
        let (mut d, _) = dev();
        let ok = d.save().unwrap();
        for bad in [
            I8042State { output: vec![0; OUTPUT_CAPACITY + 1], ..ok.clone() },
            I8042State { status: STATUS_OUTPUT_FULL, ..ok.clone() },
            I8042State { awaiting: Some(CMD_SELF_TEST), ..ok.clone() },
        ] {
            let e = d.restore(&bad).unwrap_err();
            assert_eq!(e.device, "i8042", "{e}");
        }
        assert_eq!(d.save().unwrap(), ok, "a refused state changes nothing");
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_output() {
        let (mut dev, _) = dev();
        for _ in 0..10_000 {
            dev.write(COMMAND, &[CMD_SELF_TEST]);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
    }
}
