//! Shared by the VMM integration tests: console capture and the KVM skip rule.

#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A console sink the test can read while the guest writes.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// True when /dev/kvm is usable; otherwise prints why the test is skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    let host = vmm::host::cached();
    if !host.kvm_device {
        println!("SKIP {test}: /dev/kvm is not usable here ({})", host.reason);
    }
    host.kvm_device
}
