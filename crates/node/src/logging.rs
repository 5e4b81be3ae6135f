//! `setLogLevel`: the native side's logging (`tracing`: the engines, the agent client, the VMM)
//! to stderr. One subscriber for the whole process, installed on the first level other than
//! `off`; later calls can only make it more verbose (the most verbose level asked for so far
//! wins: a MicroVm's `logLevel` is process-wide, not per VM).

use std::io::IsTerminal;
use std::sync::Mutex;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, Registry};

use super::{coded, guard};

struct Installed {
    level: LevelFilter,
    /// `None` when another subscriber was installed first (by an embedder): nothing to change.
    handle: Option<reload::Handle<LevelFilter, Registry>>,
}

static STATE: Mutex<Option<Installed>> = Mutex::new(None);

fn parse(level: &str) -> Result<LevelFilter> {
    Ok(match level {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        other => {
            return Err(coded(
                "E_INVALID_ARGUMENT",
                format!("log level {other:?}: give off, error, warn, info, debug or trace"),
            ))
        }
    })
}

fn name(level: LevelFilter) -> String {
    level.to_string().to_lowercase()
}

/// Raises the native log level to `level` (`off` | `error` | `warn` | `info` | `debug` |
/// `trace`) unless a more verbose one is in effect; returns the level in effect. Logs go to
/// stderr, for the whole process.
#[napi]
pub fn set_log_level(level: String) -> Result<String> {
    guard(|| {
        let want = parse(&level)?;
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            None if want == LevelFilter::OFF => Ok(name(LevelFilter::OFF)),
            None => {
                let (filter, handle) = reload::Layer::new(want);
                let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
                let installed = tracing_subscriber::registry().with(filter).with(layer).try_init().is_ok();
                *state = Some(Installed { level: want, handle: installed.then_some(handle) });
                Ok(name(want))
            }
            Some(i) if want > i.level => {
                if let Some(h) = &i.handle {
                    h.modify(|f| *f = want)
                        .map_err(|e| coded("E_INTERNAL", format!("cannot change the log level: {e}")))?;
                }
                i.level = want;
                Ok(name(want))
            }
            Some(i) => Ok(name(i.level)),
        }
    })
}
