//! Errors of the host core. Every variant maps to a stable code ([`Error::code`]).

use std::path::PathBuf;

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (`E_CONFIG_*`).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VMM could not start the VM (`E_NO_KVM`, `E_KERNEL_FORMAT`, ...).
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    /// The console output file cannot be created.
    #[error("cannot create consoleOutput file {path:?}: {source}; give a path in a directory this process may write to")]
    ConsoleOutput {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No thread could be started to watch the VM.
    #[error("cannot start the thread that waits for the VM: {0}; the process may have hit its thread limit")]
    Thread(std::io::Error),
}

impl Error {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config(e) => e.code(),
            Error::Vmm(e) => e.code(),
            Error::ConsoleOutput { .. } => "E_CONSOLE_OUTPUT",
            Error::Thread(_) => "E_THREAD",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
