//! Helpers shared by the exec, fs and workload bindings: running bounded blocking work on
//! tokio's blocking pool (never on the JS thread or a libuv pool thread), mapping sandbox errors
//! to `"<CODE>: <message>"`, and letting go of handles whose drop may wait off the JS thread.

use std::panic::{catch_unwind, AssertUnwindSafe};

use napi::bindgen_prelude::*;

use super::{coded, panic_error};

/// Runs `f` on tokio's blocking pool; a panic becomes `E_INTERNAL`. Only for work with a bound
/// (every agent wait has a deadline).
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    spawn_blocking(move || catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_error(p))))
        .await
        .map_err(|e| coded("E_INTERNAL", format!("the {what} task failed: {e}")))?
}

pub(crate) fn sandbox_error(e: sandbox::SandboxError) -> Error {
    coded(e.code(), e)
}

/// Drops `value` on a thread of its own (a GC finalizer runs on the JS thread; dropping a live
/// exec or file stream sends a frame on the control channel, which may wait for room).
pub(crate) fn drop_off_thread<T: Send + 'static>(value: T) {
    let spawned = std::thread::Builder::new().name("mc-drop".into()).spawn(move || drop(value));
    if let Err(e) = spawned {
        eprintln!("microcell: cannot start a thread to let go of a handle ({e}); it is leaked");
    }
}

/// A JS number (a byte count or offset) as u64: a whole number from 0 to 2^53.
pub(crate) fn whole(what: &str, n: f64) -> Result<u64> {
    if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= 9_007_199_254_740_992.0 {
        Ok(n as u64)
    } else {
        Err(coded("E_INVALID_ARGUMENT", format!("{what} is {n}: give a whole number from 0 to 2^53")))
    }
}
