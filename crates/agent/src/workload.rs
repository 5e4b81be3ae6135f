//! The boot workload: the one job of a VM, whose spec the host sends as `StartWorkload` right
//! after the handshake (over the channel: its environment may hold secrets, which the kernel
//! command line would show in the host's `/proc/<pid>/cmdline` of QEMU and in the guest's
//! `/proc/cmdline`). A VM without a control channel can still carry it as `microcell.exec=<spec>`
//! on the command line (`--exec-spec` in test mode). It runs with the console as stdout/stderr,
//! in a session of its own and (as PID 1) in an exec cgroup of its own, as every exec
//! ([`crate::cgroup`]: `pids.max`, one cpu entity with the execs against the agent, and a
//! SIGKILL from the host reaches what left its process group through `cgroup.kill`); when it ends the agent prints the status line
//! (`protocol::workload::status_line`) on the console, answers the host's `WaitWorkload`
//! (if a host asked) and ends the VM: at once after the answer went out, after
//! [`REPORT_GRACE`] when no host asked, at once when there is no control channel.

use std::time::{Duration, Instant};

use protocol::workload;
use protocol::WorkloadSpec;
use protocol::{ErrorCode, ErrorMsg, Message, WorkloadExit};

use crate::cgroup::{Cgroup, Cgroups};
use crate::exec::{launch, Launch, StdioMode};
use crate::outq::OutQueue;
use crate::sys;

/// How long the agent waits for a host to ask for the status before it ends the VM anyway.
pub const REPORT_GRACE: Duration = Duration::from_secs(1);

pub struct Workload {
    pub pid: Option<i32>,
    started: Instant,
    result: Option<WorkloadExit>,
    /// `WaitWorkload` requests not answered yet.
    waiters: Vec<u32>,
    answered: bool,
    ended_at: Option<Instant>,
    /// Its cgroup (PID 1 with cgroup2); it goes with the VM.
    cgroup: Option<Cgroup>,
}

impl Workload {
    /// Decodes a `microcell.exec=` value and starts the workload; a bad spec is a result at
    /// once (reported like an exit).
    pub fn start_from_cmdline(value: &str, console_is_channel: bool, cgroups: &mut Cgroups) -> Workload {
        match WorkloadSpec::from_cmdline_value(value) {
            Ok(spec) => Workload::start(&spec, console_is_channel, cgroups),
            Err(message) => {
                let mut w = Workload::new();
                w.finish(WorkloadExit {
                    code: None,
                    signal: None,
                    duration_ns: 0,
                    error: Some(ErrorMsg { code: ErrorCode::INVALID, errno: libc::EINVAL, message, path: None }),
                });
                w
            }
        }
    }

    fn new() -> Workload {
        Workload {
            pid: None,
            started: Instant::now(),
            result: None,
            waiters: Vec::new(),
            answered: false,
            ended_at: None,
            cgroup: None,
        }
    }

    /// Starts the workload (in a cgroup of its own where there are cgroups); a program that
    /// cannot start is a result at once (reported like an exit).
    pub fn start(spec: &WorkloadSpec, console_is_channel: bool, cgroups: &mut Cgroups) -> Workload {
        let mut w = Workload::new();
        if spec.argv.first().is_none_or(|p| p.is_empty()) {
            w.finish(WorkloadExit {
                code: None,
                signal: None,
                duration_ns: 0,
                error: Some(ErrorMsg {
                    code: ErrorCode::INVALID,
                    errno: libc::EINVAL,
                    message: "the workload has no program".into(),
                    path: None,
                }),
            });
            return w;
        }
        log!("workload: {}", spec.argv.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(" "));
        let l = Launch {
            argv: &spec.argv,
            env: &spec.env,
            clear_env: false,
            cwd: spec.cwd.as_deref(),
            user: spec.user.as_deref(),
            uid: None,
            gid: None,
            rlimits: &spec.rlimits,
        };
        let mut cgroup = cgroups.create().unwrap_or_else(|e| {
            log!("workload: {e}; it runs without a cgroup of its own");
            None
        });
        match launch(&l, StdioMode::Console { stdout_to_stderr: console_is_channel }, cgroup.as_ref()) {
            Ok(child) => {
                w.pid = Some(child.pid);
                if let Some(cg) = &mut cgroup {
                    cg.spawned();
                }
                w.cgroup = cgroup;
            }
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                w.finish(WorkloadExit { code: None, signal: None, duration_ns: 0, error: Some(e) })
            }
        }
        w
    }

    pub fn reaped(&mut self, status: i32) {
        let (code, signal) = sys::decode_status(status);
        let duration_ns = self.started.elapsed().as_nanos() as u64;
        self.pid = None;
        self.finish(WorkloadExit { code, signal, duration_ns, error: None });
    }

    fn finish(&mut self, exit: WorkloadExit) {
        if let Some(e) = &exit.error {
            log!("workload failed: {}", e.message);
        }
        crate::console_line(&format!("{}\n", workload::status_line(&exit)));
        self.result = Some(exit);
        self.ended_at = Some(Instant::now());
    }

    /// A host asks to signal the workload (its process group with `group`: it runs in a session
    /// of its own, so the group is its pid). Refused once it has ended: its pid may be reused.
    pub fn signal(&self, sig: i32, group: bool) -> Result<(), String> {
        let Some(pid) = self.pid else {
            return Err("the workload has ended".into());
        };
        if !(1..=64).contains(&sig) {
            return Err(format!("signal {sig}: give a signal number from 1 to 64"));
        }
        log!("workload: signal {sig} from the host");
        // A group SIGKILL (the host's kill) ends everything it started, also what called setsid
        // or outran kill(-pgid) in a fork loop: the cgroup's members die atomically.
        if let (libc::SIGKILL, true, Some(cg)) = (sig, group, &self.cgroup) {
            if let Err(e) = cg.kill() {
                log!("workload: {e}");
            }
        }
        sys::kill(if group { -pid } else { pid }, sig).map_err(|e| format!("signal {sig}: {e}"))
    }

    /// A host asks for the status.
    pub fn wait_request(&mut self, id: u32, out: &mut OutQueue) {
        self.waiters.push(id);
        self.answer(out);
    }

    /// Answers the waiters once the result is known.
    pub fn answer(&mut self, out: &mut OutQueue) {
        if let Some(r) = &self.result {
            for id in self.waiters.drain(..) {
                out.final_msg(id, Message::WorkloadExit(r.clone()));
                self.answered = true;
            }
        }
    }

    /// When the VM should end: `None` while the workload runs.
    pub fn end_at(&self, have_channel: bool) -> Option<Instant> {
        let at = self.ended_at?;
        Some(if self.answered || !have_channel { at } else { at + REPORT_GRACE })
    }

    /// The host went away: its requests are void.
    pub fn reset(&mut self) {
        self.waiters.clear();
    }
}
