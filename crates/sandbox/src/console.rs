//! The guest console: a sink the VMM writes guest bytes to, which tees them to an optional host
//! file (`consoleOutput`) and an optional bounded in-memory queue that a reader drains.
//!
//! - Writing never blocks on a reader and never fails: when the reader falls behind, the oldest
//!   queued bytes are dropped (and counted), so memory stays bounded by the queue capacity.
//! - The file gets every byte: it is written a line (or 8 KiB) at a time, and whatever is left
//!   when the console closes. A file that fails to write is given up (the error is kept) and
//!   the guest keeps running.
//! - Reading is pull-based: [`ConsoleReader::read`] (a future), [`ConsoleReader::read_blocking`]
//!   or [`ConsoleReader::try_read`]. After [`ConsoleHandle::close`] (the VM has ended) and once
//!   the queue is empty, reads return the end of the stream (`None`).

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// Bytes kept for a reader when none is given.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1 << 20;
/// Most bytes one read returns when the caller asks for no particular amount.
pub const DEFAULT_READ_SIZE: usize = 64 << 10;
/// The file is written when this many bytes are buffered, or at a newline.
const FILE_BUFFER: usize = 8 << 10;

/// Where console bytes go.
#[derive(Debug, Clone, Default)]
pub struct ConsoleOptions {
    /// Host file to write (created, or truncated if it exists).
    pub file: Option<PathBuf>,
    /// Keep bytes for a reader, at most this many (the oldest are dropped beyond it).
    pub queue_capacity: Option<usize>,
}

/// What happened on a console so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Bytes the guest wrote.
    pub total_bytes: u64,
    /// Bytes dropped from the reader's queue because it was full.
    pub dropped_bytes: u64,
    /// Bytes waiting in the queue.
    pub queued_bytes: usize,
    /// The console has ended (no more bytes will come).
    pub closed: bool,
    /// The first error writing the file, after which the file was given up.
    pub file_error: Option<String>,
}

/// The result of a non-blocking read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryRead {
    /// Some bytes (never empty).
    Data(Vec<u8>),
    /// Nothing now; more may come.
    Empty,
    /// The stream has ended and everything was read.
    End,
}

struct Queue {
    bytes: VecDeque<u8>,
    capacity: usize,
    dropped: u64,
    wakers: Vec<Waker>,
}

struct State {
    file: Option<File>,
    file_buf: Vec<u8>,
    file_error: Option<String>,
    queue: Option<Queue>,
    total: u64,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    readable: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the console down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        let wakers = {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            s.closed = true;
            s.flush_file();
            s.file = None;
            self.readable.notify_all();
            s.queue.as_mut().map(|q| std::mem::take(&mut q.wakers)).unwrap_or_default()
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl State {
    fn flush_file(&mut self) {
        if self.file_buf.is_empty() {
            return;
        }
        if let Some(file) = self.file.as_mut() {
            if let Err(e) = file.write_all(&self.file_buf) {
                self.file_error = Some(e.to_string());
                self.file = None;
            }
        }
        self.file_buf.clear();
    }
}

/// Creates a console. The sink goes to the VMM; the handle stays with the host.
pub fn channel(options: &ConsoleOptions) -> io::Result<(ConsoleSink, ConsoleHandle)> {
    let file = match &options.file {
        Some(path) => Some(File::create(path)?),
        None => None,
    };
    let queue = options.queue_capacity.map(|capacity| Queue {
        bytes: VecDeque::new(),
        capacity: capacity.max(1),
        dropped: 0,
        wakers: Vec::new(),
    });
    let shared = Arc::new(Shared {
        state: Mutex::new(State { file, file_buf: Vec::new(), file_error: None, queue, total: 0, closed: false }),
        readable: Condvar::new(),
    });
    Ok((ConsoleSink { shared: shared.clone() }, ConsoleHandle { shared }))
}

/// The VMM's end: `impl Write + Send`. Dropping it ends the stream.
pub struct ConsoleSink {
    shared: Arc<Shared>,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let wakers = {
            let mut s = self.shared.lock();
            if s.closed {
                return Ok(buf.len());
            }
            s.total += buf.len() as u64;
            if s.file.is_some() {
                s.file_buf.extend_from_slice(buf);
                if s.file_buf.len() >= FILE_BUFFER || buf.contains(&b'\n') {
                    s.flush_file();
                }
            }
            match s.queue.as_mut() {
                Some(q) => {
                    push_dropping_oldest(q, buf);
                    self.shared.readable.notify_all();
                    std::mem::take(&mut q.wakers)
                }
                None => Vec::new(),
            }
        };
        wakers.into_iter().for_each(Waker::wake);
        Ok(buf.len())
    }

    /// Bytes reach the file at each newline and when the console closes; a flush per byte
    /// (as a UART model does) must not cost a system call per byte.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        self.shared.close();
    }
}

fn push_dropping_oldest(q: &mut Queue, buf: &[u8]) {
    if buf.len() >= q.capacity {
        q.dropped += (q.bytes.len() + buf.len() - q.capacity) as u64;
        q.bytes.clear();
        q.bytes.extend(&buf[buf.len() - q.capacity..]);
        return;
    }
    let over = (q.bytes.len() + buf.len()).saturating_sub(q.capacity);
    if over > 0 {
        q.bytes.drain(..over);
        q.dropped += over as u64;
    }
    q.bytes.extend(buf);
}

/// The host's end: ends the stream, makes readers, reports statistics.
#[derive(Clone)]
pub struct ConsoleHandle {
    shared: Arc<Shared>,
}

impl ConsoleHandle {
    /// Ends the stream: the file gets what is buffered and is closed; readers see the end once
    /// the queue is empty. Later writes are ignored. Idempotent.
    pub fn close(&self) {
        self.shared.close();
    }

    /// A reader of the queue, when the console has one.
    pub fn reader(&self) -> Option<ConsoleReader> {
        self.shared.lock().queue.as_ref().map(|_| ConsoleReader { shared: self.shared.clone() })
    }

    pub fn stats(&self) -> ConsoleStats {
        let s = self.shared.lock();
        ConsoleStats {
            total_bytes: s.total,
            dropped_bytes: s.queue.as_ref().map_or(0, |q| q.dropped),
            queued_bytes: s.queue.as_ref().map_or(0, |q| q.bytes.len()),
            closed: s.closed,
            file_error: s.file_error.clone(),
        }
    }
}

/// Drains the console queue. Clones share the same queue (each byte is read once).
#[derive(Clone)]
pub struct ConsoleReader {
    shared: Arc<Shared>,
}

impl ConsoleReader {
    /// Takes up to `max` queued bytes without waiting.
    pub fn try_read(&self, max: usize) -> TryRead {
        take(&mut self.shared.lock(), max)
    }

    /// Waits for bytes; `None` at the end of the stream.
    pub fn read_blocking(&self, max: usize) -> Option<Vec<u8>> {
        let mut s = self.shared.lock();
        loop {
            match take(&mut s, max) {
                TryRead::Data(d) => return Some(d),
                TryRead::End => return None,
                TryRead::Empty => s = self.shared.readable.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Resolves with the next bytes (up to `max`), or `None` at the end of the stream.
    /// Runtime-agnostic: the VMM's writes wake the task.
    pub fn read(&self, max: usize) -> ReadFuture {
        ReadFuture { shared: self.shared.clone(), max }
    }

    /// Bytes dropped so far because this reader fell behind.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.lock().queue.as_ref().map_or(0, |q| q.dropped)
    }
}

fn take(s: &mut State, max: usize) -> TryRead {
    let closed = s.closed;
    let Some(q) = s.queue.as_mut() else {
        return TryRead::End;
    };
    if q.bytes.is_empty() {
        return if closed { TryRead::End } else { TryRead::Empty };
    }
    let n = q.bytes.len().min(max.max(1));
    TryRead::Data(q.bytes.drain(..n).collect())
}

/// See [`ConsoleReader::read`].
pub struct ReadFuture {
    shared: Arc<Shared>,
    max: usize,
}

impl Future for ReadFuture {
    type Output = Option<Vec<u8>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.shared.lock();
        match take(&mut s, self.max) {
            TryRead::Data(d) => Poll::Ready(Some(d)),
            TryRead::End => Poll::Ready(None),
            TryRead::Empty => {
                if let Some(q) = s.queue.as_mut() {
                    if !q.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                        q.wakers.push(cx.waker().clone());
                    }
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    fn queue_only(capacity: usize) -> (ConsoleSink, ConsoleHandle, ConsoleReader) {
        let (sink, handle) = channel(&ConsoleOptions { file: None, queue_capacity: Some(capacity) }).unwrap();
        let reader = handle.reader().unwrap();
        (sink, handle, reader)
    }

    #[test]
    fn bytes_flow_in_order_then_end() {
        let (mut sink, handle, reader) = queue_only(1024);
        sink.write_all(b"hello ").unwrap();
        sink.write_all(b"world\n").unwrap();
        assert_eq!(reader.try_read(1024), TryRead::Data(b"hello world\n".to_vec()));
        assert_eq!(reader.try_read(1024), TryRead::Empty);
        sink.write_all(b"abc").unwrap();
        assert_eq!(reader.try_read(2), TryRead::Data(b"ab".to_vec()));
        handle.close();
        assert_eq!(reader.try_read(10), TryRead::Data(b"c".to_vec()));
        assert_eq!(reader.try_read(10), TryRead::End);
        assert_eq!(reader.read_blocking(10), None);
        // Writes after the end are ignored and do not fail.
        assert_eq!(sink.write(b"late").unwrap(), 4);
        assert_eq!(reader.try_read(10), TryRead::End);
        let stats = handle.stats();
        assert_eq!(stats.total_bytes, 15);
        assert!(stats.closed);
    }

    #[test]
    fn a_slow_reader_loses_the_oldest_bytes_and_memory_stays_bounded() {
        let (mut sink, handle, reader) = queue_only(8);
        sink.write_all(b"0123456789").unwrap(); // larger than the queue: keeps the last 8
        assert_eq!(handle.stats().queued_bytes, 8);
        assert_eq!(reader.dropped_bytes(), 2);
        sink.write_all(b"ab").unwrap();
        assert_eq!(reader.dropped_bytes(), 4);
        assert_eq!(reader.try_read(100), TryRead::Data(b"456789ab".to_vec()));
        for _ in 0..10_000 {
            sink.write_all(b"x").unwrap();
        }
        assert_eq!(handle.stats().queued_bytes, 8);
        assert_eq!(reader.dropped_bytes(), 4 + 10_000 - 8);
        assert_eq!(handle.stats().total_bytes, 10 + 2 + 10_000);
    }

    #[test]
    fn without_a_queue_there_is_no_reader_and_writes_are_counted() {
        let (mut sink, handle) = channel(&ConsoleOptions::default()).unwrap();
        assert!(handle.reader().is_none());
        sink.write_all(b"abc").unwrap();
        assert_eq!(handle.stats().total_bytes, 3);
    }

    #[test]
    fn the_file_gets_every_byte_even_when_the_queue_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"old content that must go away").unwrap();
        let (mut sink, handle) =
            channel(&ConsoleOptions { file: Some(path.clone()), queue_capacity: Some(4) }).unwrap();
        for b in b"line one\nline two\npartial" {
            sink.write_all(&[*b]).unwrap();
            sink.flush().unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"line one\nline two\n", "written at each newline");
        handle.close();
        assert_eq!(std::fs::read(&path).unwrap(), b"line one\nline two\npartial");
        assert_eq!(handle.reader().unwrap().try_read(100), TryRead::Data(b"tial".to_vec()));
        assert_eq!(handle.stats().file_error, None);
    }

    #[test]
    fn big_writes_reach_the_file_without_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (mut sink, _handle) = channel(&ConsoleOptions { file: Some(path.clone()), queue_capacity: None }).unwrap();
        sink.write_all(&vec![b'x'; FILE_BUFFER]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), FILE_BUFFER);
        drop(sink); // dropping the sink ends the stream too
        assert_eq!(std::fs::read(&path).unwrap().len(), FILE_BUFFER);
    }

    #[test]
    fn an_unwritable_file_is_an_error_at_creation() {
        let e = channel(&ConsoleOptions { file: Some("/nonexistent-dir/c.log".into()), queue_capacity: None });
        assert!(e.is_err());
    }

    #[test]
    fn a_failing_file_is_given_up_and_the_guest_keeps_going() {
        let (mut sink, handle) =
            channel(&ConsoleOptions { file: Some("/dev/full".into()), queue_capacity: Some(64) }).unwrap();
        sink.write_all(b"a\n").unwrap();
        sink.write_all(b"b\n").unwrap();
        let stats = handle.stats();
        assert!(stats.file_error.is_some(), "{stats:?}");
        assert_eq!(handle.reader().unwrap().try_read(64), TryRead::Data(b"a\nb\n".to_vec()));
    }

    #[test]
    fn dropping_the_sink_ends_the_stream() {
        let (mut sink, _handle, reader) = queue_only(16);
        sink.write_all(b"z").unwrap();
        drop(sink);
        assert_eq!(reader.read_blocking(16), Some(b"z".to_vec()));
        assert_eq!(reader.read_blocking(16), None);
    }

    #[test]
    fn a_blocking_reader_wakes_for_data_and_for_the_end() {
        let (mut sink, handle, reader) = queue_only(1024);
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(chunk) = reader.read_blocking(3) {
                got.extend(chunk);
            }
            got
        });
        for i in 0..100u8 {
            sink.write_all(&[b'a' + i % 26]).unwrap();
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        handle.close();
        let got = t.join().unwrap();
        assert_eq!(got.len(), 100);
        assert_eq!(got[25], b'z');
    }

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_future_is_woken_by_a_write_and_by_close() {
        let (mut sink, handle, reader) = queue_only(1024);
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = reader.read(100);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending()); // registered once
        sink.write_all(b"hi").unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(Pin::new(&mut fut).poll(&mut cx), Poll::Ready(Some(b"hi".to_vec())));
        let mut fut = reader.read(100);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        handle.close();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert_eq!(Pin::new(&mut fut).poll(&mut cx), Poll::Ready(None));
    }
}
