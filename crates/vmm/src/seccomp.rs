//! seccomp filters for the VMM's own threads (vCPU threads and the event loop thread): the
//! threads that act on what a guest sends. Each installs the filter itself, before it runs
//! guest code or handles a device event, so the caller's threads in the same process are never
//! filtered (no `TSYNC`) and everything a filtered thread starts inherits the filter.
//!
//! A system call outside the allow list is not a process kill (that would take the whole process
//! down with the VM) but a trap: the `SIGSYS` handler makes the call fail with `EPERM` and records it in
//! the thread; the thread then ends its VM with `E_SECCOMP` (vCPU loop after the exit it was
//! handling, event loop after the handler). Only that VM ends; the process goes on.
//!
//! `MICROCELL_SECCOMP=0` turns the filters off (to debug a device that needs a call the list
//! lacks); a filter that cannot be installed ends the VM rather than running it unfiltered.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::exit::ExitReason;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule,
};

/// The environment variable that turns the filters off when it is `0`.
pub const ENV_SWITCH: &str = "MICROCELL_SECCOMP";

/// `si_code` of a `SIGSYS` raised by a seccomp `RET_TRAP`.
const SYS_SECCOMP: libc::c_int = 1;

thread_local! {
    /// The system call this thread's filter refused last (0: none), set by the SIGSYS handler.
    static REFUSED: Cell<i64> = const { Cell::new(0) };
    /// Whether this thread runs under our filter (the handler leaves other threads' SIGSYS alone).
    static FILTERED: Cell<bool> = const { Cell::new(false) };
}

/// The filter of the VMM threads, compiled once per process.
#[derive(Clone, Copy)]
pub struct ThreadFilter {
    program: &'static BpfProgram,
}

impl ThreadFilter {
    /// The filter to install, or `None` when `MICROCELL_SECCOMP=0`. Compiles it on first use
    /// (on the caller's thread, before any VMM thread starts).
    pub fn for_vmm_threads() -> Result<Option<ThreadFilter>, String> {
        if std::env::var_os(ENV_SWITCH).is_some_and(|v| v == "0") {
            return Ok(None);
        }
        static PROGRAM: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
        match PROGRAM.get_or_init(compile) {
            Ok(program) => Ok(Some(ThreadFilter { program })),
            Err(e) => Err(e.clone()),
        }
    }

    /// Installs the filter on the calling thread (for good: a filter cannot be removed).
    pub fn install(self) -> Result<(), String> {
        install_sigsys_handler()?;
        seccompiler::apply_filter(self.program).map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
        FILTERED.with(|f| f.set(true));
        Ok(())
    }
}

/// A system call the filter refused on this thread since the last call (then forgotten).
pub fn take_refused() -> Option<Refused> {
    let nr = REFUSED.with(|r| r.replace(0));
    (nr != 0).then_some(Refused { syscall: nr })
}

/// The VM ending for a system call the filter refused on this thread since the last call.
/// `thread` is formatted only when there is one (this runs after every vCPU exit).
pub fn take_refused_exit(thread: impl std::fmt::Display) -> Option<ExitReason> {
    take_refused().map(|r| ExitReason::crashed(Refused::CODE, r.message(thread)))
}

/// A system call a filtered thread made that is not on its allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub syscall: i64,
}

impl Refused {
    /// The stable code of the VM ending it causes.
    pub const CODE: &'static str = "E_SECCOMP";

    /// What to tell the user, naming the thread.
    pub fn message(&self, thread: impl std::fmt::Display) -> String {
        format!(
            "the VMM's {thread} made system call {} ({}), which its seccomp filter forbids: the VM was stopped \
             (a device may have been driven by a hostile guest, or it needs a call the filter lacks: \
             {ENV_SWITCH}=0 turns the filter off to find out)",
            self.syscall,
            syscall_name(self.syscall)
        )
    }
}

fn syscall_name(nr: i64) -> &'static str {
    ALLOWED
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| *name)
        .or_else(|| NOTABLE.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name))
        .unwrap_or("see `ausyscall`")
}

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => { &[$((libc::$name, stringify!($name)),)*] };
}

/// Allowed with any arguments. Why each is there: memory (the allocator), waiting and time
/// (locks, parking, `Instant`/`SystemTime` where the vDSO falls back to the kernel), signals
/// (the vCPU kick and its return), device I/O on descriptors opened before the VM started
/// (disk images, sockets to the host side, eventfds), and thread exit.
const ALLOWED: &[(i64, &str)] = syscalls![
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_mprotect,
    SYS_futex,
    SYS_sched_yield,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_gettimeofday,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_gettid,
    SYS_getpid,
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_lseek,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_fstat,
    SYS_recvfrom,
    SYS_sendto,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_recvmmsg,
    SYS_sendmmsg,
    SYS_shutdown,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_close,
    SYS_getrandom,
    SYS_exit,
];

/// Names for refusals worth recognising in a message (never allowed).
const NOTABLE: &[(i64, &str)] = syscalls![
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_clone,
    SYS_clone3,
    SYS_open,
    SYS_openat,
    SYS_openat2,
    SYS_socket,
    SYS_connect,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_ptrace,
    SYS_kill,
    SYS_mount,
    SYS_unlink,
    SYS_unlinkat,
    SYS_rename,
    SYS_renameat2,
    SYS_chmod,
    SYS_fchmod,
    SYS_chown,
    SYS_setuid,
    SYS_prctl,
    SYS_exit_group,
    SYS_getppid,
    SYS_process_vm_writev,
    SYS_memfd_create,
    SYS_statx,
    SYS_newfstatat,
];

// The KVM ioctls a vCPU thread issues while the VM runs (state reads on a crash exit, line
// interrupts); every other ioctl — the VM and system ones included — is refused.
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const KVM_IRQ_LINE: u64 = 0x4008_ae61;
const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;

/// What a [`FilteredThread`] runs: it is told whether its filter went in.
pub type ThreadWork = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A VMM thread started ahead of its work, its filter installed meanwhile: the kernel compiles
/// a filter for each thread that installs it (~0.15-0.2 ms for ours here, `bench/results/
/// compare.md`), which would otherwise lie between a boot or restore call and the guest's first
/// instruction. A VM shell starts its threads when it is made (`VmShell`); dropped unused, a
/// thread ends without running anything.
pub struct FilteredThread {
    work: std::sync::mpsc::SyncSender<ThreadWork>,
    handle: std::thread::JoinHandle<()>,
}

impl FilteredThread {
    /// Starts thread `name`; it installs `filter` (none: filters off) and waits for its work.
    pub fn spawn(name: String, filter: Option<ThreadFilter>) -> std::io::Result<FilteredThread> {
        let (work, next) = std::sync::mpsc::sync_channel::<ThreadWork>(1);
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let installed = filter.map_or(Ok(()), ThreadFilter::install);
            if let Ok(work) = next.recv() {
                work(installed);
            }
        })?;
        Ok(FilteredThread { work, handle })
    }

    /// Hands the thread its work; its handle, or the work back when the thread has gone.
    pub fn run(self, work: ThreadWork) -> Result<std::thread::JoinHandle<()>, ThreadWork> {
        match self.work.send(work) {
            Ok(()) => Ok(self.handle),
            Err(std::sync::mpsc::SendError(work)) => Err(work),
        }
    }
}

fn compile() -> Result<BpfProgram, String> {
    let e = |e: seccompiler::BackendError| format!("cannot build the seccomp filter: {e}");
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|(nr, _)| (*nr, Vec::new())).collect();
    let arg_is = |index: u8, len: Len, value: u64| -> Result<SeccompRule, String> {
        SeccompRule::new(vec![Cond::new(index, len, Op::Eq, value).map_err(e)?]).map_err(e)
    };
    let ioctls = [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_IRQ_LINE, KVM_SIGNAL_MSI];
    rules.insert(libc::SYS_ioctl, ioctls.iter().map(|&req| arg_is(1, Len::Dword, req)).collect::<Result<_, _>>()?);
    // Descriptor flags only: no F_DUPFD (a new descriptor), no locks or leases.
    let fcntls = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL];
    rules.insert(libc::SYS_fcntl, fcntls.iter().map(|&c| arg_is(1, Len::Dword, c as u64)).collect::<Result<_, _>>()?);
    // Signals to this process's own threads only (the kick; abort's SIGABRT).
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    rules.insert(libc::SYS_tgkill, vec![arg_is(0, Len::Dword, pid as u64)?]);
    let arch = std::env::consts::ARCH.try_into().map_err(e)?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(e)?;
    filter.try_into().map_err(e)
}

/// The SIGSYS action there was before ours: it gets every SIGSYS that is not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

fn install_sigsys_handler() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let os_err = |what: &str| format!("cannot {what} the SIGSYS handler: {}", std::io::Error::last_os_error());
            // SAFETY: zeroed sigactions are valid; the first call only reads the current action.
            let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
            if unsafe { libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut previous) } != 0 {
                return Err(os_err("read"));
            }
            let _ = PREVIOUS.set(previous);
            // SAFETY: as above; the handler is async-signal-safe (thread-local cells, a register
            // store, an atomic load of PREVIOUS).
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            // SAFETY: the mask and the action are valid, owned values.
            if unsafe { libc::sigemptyset(&mut action.sa_mask) } != 0
                || unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0
            {
                return Err(os_err("install"));
            }
            Ok(())
        })
        .clone()
}

/// The head of `siginfo_t` for SIGSYS (`_sigsys` of the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

extern "C" fn on_sigsys(signo: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t whose SIGSYS layout is SigsysInfo.
    let sys = unsafe { &*info.cast::<SigsysInfo>() };
    if sys.code == SYS_SECCOMP && FILTERED.with(Cell::get) {
        REFUSED.with(|r| r.set(i64::from(sys.syscall)));
        // SAFETY: `context` is the ucontext_t of the interrupted thread; rax is the value the
        // refused system call returns.
        unsafe {
            (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM)
        };
        return;
    }
    // Not ours: what was there before us decides.
    let (action, flags) = PREVIOUS.get().map_or((libc::SIG_DFL, 0), |p| (p.sa_sigaction, p.sa_flags));
    match action {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // SAFETY: restoring the default action and re-raising is async-signal-safe; the
            // signal is blocked until this handler returns, then kills as SIGSYS would have.
            unsafe {
                libc::signal(libc::SIGSYS, libc::SIG_DFL);
                libc::raise(libc::SIGSYS);
            }
        }
        f if flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: an SA_SIGINFO handler has this signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(f) };
            f(signo, info, context);
        }
        f => {
            // SAFETY: a plain handler has this signature.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(f) };
            f(signo);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> ThreadFilter {
        ThreadFilter::for_vmm_threads().unwrap().expect("MICROCELL_SECCOMP is not 0 in tests")
    }

    #[test]
    fn a_refused_call_fails_with_eperm_in_the_filtered_thread_only() {
        let f = filter();
        let (nr, errno, refused, after) = std::thread::spawn(move || {
            f.install().unwrap();
            // SAFETY: getppid has no preconditions; here the filter refuses it. (Through
            // syscall(2): glibc's getppid() assumes it cannot fail and leaves errno alone.)
            let rc = unsafe { libc::syscall(libc::SYS_getppid) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            let refused = take_refused();
            (rc, errno, refused, take_refused())
        })
        .join()
        .unwrap();
        assert_eq!((nr, errno), (-1, Some(libc::EPERM)));
        assert_eq!(refused, Some(Refused { syscall: libc::SYS_getppid }));
        assert_eq!(after, None, "a refusal is reported once");
        assert!(refused.unwrap().message("vCPU 0 thread").contains("getppid"));
        // This thread is not filtered.
        // SAFETY: as above.
        assert!(unsafe { libc::getppid() } > 0);
        assert_eq!(take_refused(), None);
    }

    #[test]
    fn the_allow_list_keeps_what_vmm_threads_do_and_refuses_the_rest() {
        let f = filter();
        let results = std::thread::spawn(move || {
            f.install().unwrap();
            let mut seen = Vec::new();
            // Allowed: allocation, time, descriptor flags.
            let v = vec![0u8; 8 << 20];
            seen.push(("alloc", v.len() == 8 << 20 && take_refused().is_none()));
            let _ = std::time::SystemTime::now();
            std::thread::sleep(std::time::Duration::from_millis(1));
            seen.push(("time", take_refused().is_none()));
            // SAFETY: F_GETFD on fd 2 only reads its flags.
            unsafe { libc::fcntl(2, libc::F_GETFD) };
            seen.push(("fcntl F_GETFD", take_refused().is_none()));
            // SAFETY: F_DUPFD would create a descriptor: refused, so nothing is created.
            let rc = unsafe { libc::fcntl(2, libc::F_DUPFD, 100) };
            seen.push(("fcntl F_DUPFD refused", rc == -1 && take_refused().is_some()));
            // SAFETY: a path that is a valid C string; refused before the kernel looks at it.
            let rc = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
            seen.push(("open refused", rc == -1 && take_refused().is_some()));
            // SAFETY: socket with constant arguments; refused.
            let rc = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            seen.push(("socket refused", rc == -1 && take_refused().is_some()));
            // SAFETY: an ioctl the filter does not know (TIOCSTI on fd 0), refused before it runs.
            let rc = unsafe { libc::ioctl(0, libc::TIOCSTI, c"x".as_ptr()) };
            seen.push(("ioctl TIOCSTI refused", rc == -1 && take_refused().is_some()));
            seen
        })
        .join()
        .unwrap();
        for (what, ok) in results {
            assert!(ok, "{what}");
        }
    }
}
