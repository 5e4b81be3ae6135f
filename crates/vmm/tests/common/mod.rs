//! Shared by the VMM integration tests: console capture and the KVM requirement.

#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

mod kvm;
#[allow(unused_imports)]
pub use kvm::{require_kvm, require_linux_kvm};

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
