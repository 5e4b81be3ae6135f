//! The agent watchdog: the host's own check that a sandbox's guest still serves it.
//!
//! A guest can end without the engine seeing an end: `poweroff -f` / `halt -f` halt every vCPU
//! on a machine with no power-off device (QEMU and the VMM run on), an agent can be starved or
//! stopped, a hostile guest can close the channel or send garbage. None of these may leave a
//! sandbox running with `wait()`, execs and streams pending. So a thread per sandbox pings the
//! agent every [`Bounds::every`]; while the VM runs (not paused, no snapshot being written):
//! - no answer for [`Bounds::probe_after`]: the engine is asked whether the guest has halted
//!   ([`RunningVm::halted`]): if so the VM is killed at once, its end `E_GUEST_HALTED`;
//! - no answer for [`Bounds::lost_after`]: the VM is killed, its end `E_AGENT_LOST`;
//! - the channel closed (or broke) while the VM runs: the engine gets [`Bounds::closed_grace`]
//!   to report its own end (a reset closes the channel first), else the VM is killed,
//!   `E_AGENT_LOST`.
//!
//! Killing ends the channel, so execs, streams and `wait()` settle (`E_CHANNEL_CLOSED`, the exit
//! status). The bounds leave room for TCG (a slow guest answers a ping in milliseconds even under
//! load) and count no time while the VM is paused or snapshotted.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::Message;

use crate::agent_client::AgentClient;
use crate::engine::{RunningVm, VmExit};
use crate::error::SandboxError;

/// The stable code of an end the watchdog found: the agent stopped answering or hung up.
pub const E_AGENT_LOST: &str = "E_AGENT_LOST";
/// The stable code of a guest that halted every vCPU with interrupts off.
pub const E_GUEST_HALTED: &str = "E_GUEST_HALTED";

/// How long the watchdog waits for what.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Between pings (each one a frame each way).
    pub every: Duration,
    /// Silence after which the engine is asked whether the guest halted (then again each time
    /// as long again passes).
    pub probe_after: Duration,
    /// Silence of a running guest after which the agent counts as lost.
    pub lost_after: Duration,
    /// How long a closed channel waits for the engine's own report of the end.
    pub closed_grace: Duration,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            every: Duration::from_secs(2),
            probe_after: Duration::from_secs(1),
            lost_after: Duration::from_secs(15),
            closed_grace: Duration::from_secs(2),
        }
    }
}

/// How long one wait for the answer lasts before the watchdog looks at the VM again.
const SLICE: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Control {
    /// The sandbox is being dropped: the thread ends.
    done: Mutex<bool>,
    cv: Condvar,
    /// The host is ending the VM (stop): silence and a closed channel are expected.
    standing_down: AtomicBool,
    /// Host operations that stop the guest (snapshots) in progress.
    holds: AtomicU32,
}

impl Control {
    /// Sleeps up to `d`; `true` when the watchdog is to end.
    fn sleep(&self, d: Duration) -> bool {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return true;
        }
        *self.cv.wait_timeout(done, d).unwrap_or_else(|e| e.into_inner()).0
    }

    fn is_done(&self) -> bool {
        *self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether silence does not count now.
    fn excused(&self, vm: &dyn RunningVm) -> bool {
        self.holds.load(Ordering::SeqCst) > 0 || vm.is_paused()
    }
}

/// The watchdog of one sandbox; dropping it ends and joins its thread.
pub(crate) struct Watchdog {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

/// While it lives, the watchdog counts no silence ([`Watchdog::hold`]).
pub(crate) struct Hold(Arc<Control>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Watchdog {
    /// Starts the thread; a sandbox whose thread cannot start runs without one (logged).
    pub(crate) fn start(agent: Arc<AgentClient>, vm: Arc<dyn RunningVm>, bounds: Bounds) -> Watchdog {
        let control = Arc::new(Control::default());
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name("mc-watchdog".into())
            .spawn(move || run(&agent, vm.as_ref(), &c, bounds))
            .map_err(|e| tracing::warn!("cannot start the agent watchdog: {e}"))
            .ok();
        Watchdog { control, thread }
    }

    /// The host is ending the VM itself: the watchdog stops judging.
    pub(crate) fn stand_down(&self) {
        self.control.standing_down.store(true, Ordering::SeqCst);
    }

    /// Silence does not count while the returned guard lives (the guest is stopped by the host).
    pub(crate) fn hold(&self) -> Hold {
        self.control.holds.fetch_add(1, Ordering::SeqCst);
        Hold(self.control.clone())
    }
}

impl Watchdog {
    /// Ends and joins the thread (at once: its waits are short). Idempotent.
    pub(crate) fn shutdown(&mut self) {
        *self.control.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.control.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(agent: &AgentClient, vm: &dyn RunningVm, control: &Control, bounds: Bounds) {
    let mut nonce = 0u64;
    loop {
        if control.sleep(bounds.every) {
            return;
        }
        if vm.try_wait().is_some() || control.standing_down.load(Ordering::SeqCst) {
            return;
        }
        if control.excused(vm) {
            continue;
        }
        nonce += 1;
        let pending = match agent.send(Message::Ping(nonce)) {
            Ok(p) => p,
            Err(e) => return closed(vm, control, bounds, &e),
        };
        let mut silent = Duration::ZERO;
        let mut next_probe = bounds.probe_after;
        loop {
            let t = Instant::now();
            match pending.wait_timeout(SLICE) {
                // Any answer (a Pong, even an error) means the agent serves.
                Ok(Some(_)) => break,
                Ok(None) => {}
                Err(e) => return closed(vm, control, bounds, &e),
            }
            if control.is_done() || vm.try_wait().is_some() || control.standing_down.load(Ordering::SeqCst) {
                return;
            }
            if control.excused(vm) {
                silent = Duration::ZERO;
                next_probe = bounds.probe_after;
                continue;
            }
            silent += t.elapsed();
            if silent >= next_probe {
                next_probe = silent + bounds.probe_after;
                if let Some(why) = vm.halted() {
                    if control.excused(vm) {
                        continue;
                    }
                    tracing::warn!("{why}: ending the sandbox");
                    return end(vm, E_GUEST_HALTED, why);
                }
            }
            if silent >= bounds.lost_after {
                let why = format!(
                    "the guest agent did not answer for {} s while the VM ran (stopped, starved or hung): the sandbox was ended",
                    bounds.lost_after.as_secs()
                );
                tracing::warn!("{why}");
                return end(vm, E_AGENT_LOST, why);
            }
        }
    }
}

/// The channel closed (or broke) while the watchdog looked.
fn closed(vm: &dyn RunningVm, control: &Control, bounds: Bounds, e: &SandboxError) {
    if control.standing_down.load(Ordering::SeqCst) || control.is_done() {
        return;
    }
    // A VM that ends closes its channel: give the engine a moment to say so.
    if vm.wait_timeout(bounds.closed_grace).is_some()
        || control.standing_down.load(Ordering::SeqCst)
        || control.is_done()
    {
        return;
    }
    let why = format!("the control channel to the guest agent failed while the VM ran ({e}): the sandbox was ended");
    tracing::warn!("{why}");
    end(vm, E_AGENT_LOST, why);
}

fn end(vm: &dyn RunningVm, code: &str, message: String) {
    vm.kill_because(VmExit::Crashed { code: code.into(), message });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::{ConsoleReader, ConsoleStats};
    use crate::engine::{EngineKind, ExitSlot};
    use protocol::{Decoder, Frame};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A VM that only has an exit slot, a pause switch and a halted answer.
    #[derive(Default)]
    struct FakeVm {
        exit: Arc<ExitSlot>,
        paused: AtomicBool,
        halted: AtomicBool,
        kills: AtomicU32,
    }

    impl RunningVm for FakeVm {
        fn engine(&self) -> EngineKind {
            EngineKind::Qemu
        }
        fn snapshot(&self, _: &std::path::Path) -> crate::error::Result<()> {
            Ok(())
        }
        fn pause(&self) -> crate::error::Result<()> {
            Ok(())
        }
        fn resume(&self) -> crate::error::Result<()> {
            Ok(())
        }
        fn is_paused(&self) -> bool {
            self.paused.load(Ordering::SeqCst)
        }
        fn set_egress(&self, _: vmm::EgressPolicy) -> crate::error::Result<()> {
            Ok(())
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn take_channel(&self) -> Option<UnixStream> {
            None
        }
        fn exit_slot(&self) -> &Arc<ExitSlot> {
            &self.exit
        }
        fn kill(&self) {
            self.kills.fetch_add(1, Ordering::SeqCst);
            self.exit.set(VmExit::Killed);
        }
        fn halted(&self) -> Option<String> {
            self.halted.load(Ordering::SeqCst).then(|| "halted".into())
        }
        fn console(&self) -> Option<ConsoleReader> {
            None
        }
        fn console_stats(&self) -> ConsoleStats {
            ConsoleStats::default()
        }
        fn console_tail(&self) -> String {
            String::new()
        }
    }

    fn quick() -> Bounds {
        Bounds {
            every: Duration::from_millis(20),
            probe_after: Duration::from_millis(100),
            lost_after: Duration::from_millis(400),
            closed_grace: Duration::from_millis(100),
        }
    }

    /// An agent end that answers pings while `serve` is set, and reads (without answering)
    /// otherwise.
    fn agent(serve: Arc<AtomicBool>) -> (Arc<AgentClient>, std::thread::JoinHandle<()>) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut d = Decoder::new();
            let mut buf = [0u8; 4096];
            loop {
                while let Some(f) = d.next_frame().unwrap() {
                    if let (Message::Ping(n), true) = (&f.msg, serve.load(Ordering::SeqCst)) {
                        let _ = theirs.write_all(&Frame::new(f.id, Message::Pong(*n)).to_bytes().unwrap());
                    }
                }
                match theirs.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => d.feed(&buf[..n]),
                }
            }
        });
        (Arc::new(AgentClient::new(ours).unwrap()), t)
    }

    fn code(vm: &FakeVm) -> Option<String> {
        match vm.exit.get()? {
            VmExit::Crashed { code, .. } => Some(code),
            other => Some(format!("{other:?}")),
        }
    }

    #[test]
    fn a_serving_agent_keeps_the_vm_and_a_silent_one_ends_it_within_the_bound() {
        let serve = Arc::new(AtomicBool::new(true));
        let (client, _t) = agent(serve.clone());
        let vm = Arc::new(FakeVm::default());
        let dog = Watchdog::start(client.clone(), vm.clone(), quick());
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(vm.exit.get(), None, "answered pings: it runs on");
        serve.store(false, Ordering::SeqCst);
        let t = Instant::now();
        let exit = vm.exit.wait_timeout(Duration::from_secs(5));
        assert!(exit.is_some(), "a silent agent ends the VM");
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(350) && took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(code(&vm).as_deref(), Some(E_AGENT_LOST));
        assert_eq!(vm.kills.load(Ordering::SeqCst), 1);
        drop(dog);
    }

    #[test]
    fn a_halted_guest_ends_at_the_first_probe() {
        let (client, _t) = agent(Arc::new(AtomicBool::new(false)));
        let vm = Arc::new(FakeVm::default());
        vm.halted.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let _dog = Watchdog::start(client, vm.clone(), quick());
        assert!(vm.exit.wait_timeout(Duration::from_secs(5)).is_some());
        assert!(t.elapsed() < Duration::from_millis(350), "{:?}: before lost_after", t.elapsed());
        assert_eq!(code(&vm).as_deref(), Some(E_GUEST_HALTED));
    }

    #[test]
    fn silence_does_not_count_while_paused_or_held_or_standing_down() {
        let (client, _t) = agent(Arc::new(AtomicBool::new(false)));
        let vm = Arc::new(FakeVm::default());
        vm.paused.store(true, Ordering::SeqCst);
        let dog = Watchdog::start(client.clone(), vm.clone(), quick());
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(vm.exit.get(), None, "paused");
        let hold = dog.hold();
        vm.paused.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(vm.exit.get(), None, "held (a snapshot)");
        drop(hold);
        assert!(vm.exit.wait_timeout(Duration::from_secs(5)).is_some(), "counted again after the hold");
        assert_eq!(code(&vm).as_deref(), Some(E_AGENT_LOST));

        let (client, _t) = agent(Arc::new(AtomicBool::new(false)));
        let vm = Arc::new(FakeVm::default());
        let dog = Watchdog::start(client, vm.clone(), quick());
        dog.stand_down();
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(vm.exit.get(), None, "the host is stopping it");
        let t = Instant::now();
        drop(dog);
        assert!(t.elapsed() < Duration::from_millis(500), "the thread ends at once");
    }

    #[test]
    fn a_channel_that_closes_while_the_vm_runs_ends_it() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = Arc::new(AgentClient::new(ours).unwrap());
        let vm = Arc::new(FakeVm::default());
        let _dog = Watchdog::start(client, vm.clone(), quick());
        drop(theirs);
        assert!(vm.exit.wait_timeout(Duration::from_secs(5)).is_some());
        assert_eq!(code(&vm).as_deref(), Some(E_AGENT_LOST));

        // A VM that reports its own end within the grace keeps that end.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = Arc::new(AgentClient::new(ours).unwrap());
        let vm = Arc::new(FakeVm::default());
        let _dog = Watchdog::start(client, vm.clone(), quick());
        std::thread::sleep(Duration::from_millis(50));
        drop(theirs);
        vm.exit.set(VmExit::GuestReset);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(vm.exit.get(), Some(VmExit::GuestReset));
        assert_eq!(vm.kills.load(Ordering::SeqCst), 0);
    }
}
