//! One thread per VM that waits on host-side fds (queue ioeventfds, device sockets) with epoll
//! and runs the handler registered for each. vCPU threads never block on host I/O.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::exit::ExitReason;
use crate::seccomp::{self, FilteredThread, ThreadFilter};

/// Runs on the event loop thread when its fd is ready; gets the ready set.
pub type Handler = Box<dyn FnMut(EventSet) + Send>;

/// Lets a device change what it waits for (e.g. stop reading a socket while the guest has
/// no buffers to receive into, so a level-triggered fd does not spin the loop).
#[derive(Clone)]
pub struct Interest {
    epoll: Arc<Epoll>,
    fd: RawFd,
    token: u64,
}

impl Interest {
    pub fn set(&self, events: EventSet) {
        if let Err(e) = self.epoll.ctl(ControlOperation::Modify, self.fd, EpollEvent::new(events, self.token)) {
            tracing::warn!("epoll modify failed: {e}");
        }
    }
}

pub struct EventLoop {
    epoll: Arc<Epoll>,
    handlers: HashMap<u64, Handler>,
    stop: EventFd,
}

const STOP_TOKEN: u64 = u64::MAX;

impl EventLoop {
    pub fn new() -> std::io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))?;
        Ok(EventLoop { epoll, handlers: HashMap::new(), stop })
    }

    /// Watches `fd` for `events`; the fd must stay open while the loop runs.
    pub fn add(&mut self, fd: RawFd, events: EventSet, handler: Handler) -> std::io::Result<Interest> {
        // The fd is the token: unique while open, and known to whoever holds the fd.
        let token = fd as u64;
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        self.handlers.insert(token, handler);
        Ok(Interest { epoll: self.epoll.clone(), fd, token })
    }

    /// The `Interest` for `fd`, usable once the fd is `add`ed (a device needs it before its
    /// handler exists).
    pub fn interest(&self, fd: RawFd) -> Interest {
        Interest { epoll: self.epoll.clone(), fd, token: fd as u64 }
    }

    /// Starts the thread a VM's loop will run on (its work comes with `run_on`).
    pub fn spawn_thread(filter: Option<ThreadFilter>) -> std::io::Result<FilteredThread> {
        FilteredThread::spawn("mc-events".into(), filter)
    }

    /// Runs the loop of a VM on `thread` (started earlier, its seccomp filter installed; one is
    /// started now when there is none); a system call the filter refuses in a handler ends the
    /// VM through `end_vm`. A VM with nothing to watch gets no thread (it would only cost
    /// start-up time).
    pub fn run_on(
        mut self,
        thread: Option<FilteredThread>,
        end_vm: Box<dyn Fn(ExitReason) + Send>,
    ) -> std::io::Result<Option<EventLoopHandle>> {
        if self.handlers.is_empty() {
            return Ok(None);
        }
        let thread = match thread {
            Some(t) => t,
            None => Self::spawn_thread(ThreadFilter::for_vmm_threads().map_err(std::io::Error::other)?)?,
        };
        let stop = self.stop.try_clone()?;
        let thread = thread
            .run(Box::new(move |installed| {
                const THREAD: &str = "event loop thread";
                if let Err(e) = installed {
                    return end_vm(ExitReason::crashed(seccomp::Refused::CODE, format!("{THREAD}: {e}")));
                }
                self.run(&mut || match seccomp::take_refused_exit(THREAD) {
                    Some(reason) => {
                        end_vm(reason);
                        false
                    }
                    None => true,
                })
            }))
            .map_err(|_| std::io::Error::other("the event loop thread ended before it got its work"))?;
        Ok(Some(EventLoopHandle { stop, thread: Mutex::new(Some(thread)) }))
    }

    /// Starts the loop thread, unfiltered (tests).
    pub fn spawn(mut self, name: String) -> std::io::Result<EventLoopHandle> {
        let stop = self.stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || self.run(&mut || true))?;
        Ok(EventLoopHandle { stop, thread: Mutex::new(Some(thread)) })
    }

    /// Waits and dispatches until stopped, or until `go_on` (asked after each handler) says no.
    fn run(&mut self, go_on: &mut dyn FnMut() -> bool) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("event loop stopped: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == STOP_TOKEN {
                    return;
                }
                if let Some(handler) = self.handlers.get_mut(&ev.data()) {
                    handler(ev.event_set());
                    if !go_on() {
                        return;
                    }
                }
            }
        }
    }
}

/// Stops the loop thread when dropped.
pub struct EventLoopHandle {
    stop: EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Never join from the loop thread itself (a handler may drop the last reference).
        if let Some(t) = thread.filter(|t| t.thread().id() != std::thread::current().id()) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_handlers_and_stops() {
        let mut el = EventLoop::new().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = evt.try_clone().unwrap();
        el.add(
            evt.as_raw_fd(),
            EventSet::IN,
            Box::new(move |_| {
                tx.send(reader.read().unwrap()).unwrap();
            }),
        )
        .unwrap();
        let handle = el.spawn("test-loop".into()).unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), 3);
        drop(handle);
    }

    #[test]
    fn a_refused_call_in_a_handler_ends_the_vm_and_the_loop_only() {
        let mut el = EventLoop::new().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let reader = evt.try_clone().unwrap();
        el.add(
            evt.as_raw_fd(),
            EventSet::IN,
            Box::new(move |_| {
                let _ = reader.read();
                // What a compromised device might try: a new socket (refused, EPERM).
                // SAFETY: constant arguments; the filter refuses it before the kernel acts.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                assert_eq!(fd, -1);
            }),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let filter = crate::seccomp::ThreadFilter::for_vmm_threads().unwrap();
        assert!(filter.is_some(), "the filter is on unless MICROCELL_SECCOMP=0");
        let tx = Mutex::new(tx);
        let thread = Some(FilteredThread::spawn("test-loop".into(), filter).unwrap());
        let handle = el
            .run_on(thread, Box::new(move |reason| tx.lock().unwrap().send(reason).unwrap()))
            .unwrap()
            .expect("a thread: one fd is watched");
        evt.write(1).unwrap();
        match rx.recv_timeout(std::time::Duration::from_secs(5)).expect("the VM is ended") {
            ExitReason::Crashed { code, message } => {
                assert_eq!(code, "E_SECCOMP");
                assert!(message.contains("event loop thread") && message.contains("SYS_socket"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The loop has stopped (the join in drop returns) and this thread may still do it all.
        drop(handle);
        // SAFETY: as above, unfiltered here.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        // SAFETY: the descriptor was just opened here.
        unsafe { libc::close(fd) };
    }
}
