//! File operations end to end without a VM: the agent as a host process, the real host client.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{say, Agent};
use sandbox::fs::{CopyToHostOptions, WriteOptions};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn small_files_and_one_shot_operations() {
    let a = Agent::spawn();
    let c = &a.client;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("a/b/c.txt");
    // Parents on request; the exact mode, whatever the umask.
    c.write_file(p(&f), b"hello", WriteOptions { mode: Some(0o640), parents: true, ..Default::default() }).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"hello");
    assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777, 0o640);
    c.write_file(p(&f), b" world", WriteOptions { append: true, ..Default::default() }).unwrap();
    assert_eq!(c.read_file(p(&f)).unwrap(), b"hello world");
    assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777, 0o640, "append keeps the mode");
    // Ranged reads.
    let mut s = c.open_read(p(&f), 6, Some(3)).unwrap();
    assert_eq!(s.read_chunk(Duration::from_secs(5)).unwrap().unwrap(), b"wor");
    assert_eq!(s.read_chunk(Duration::from_secs(5)).unwrap(), None);
    // Empty files and /proc files (no size) read whole.
    c.write_file(&format!("{}/empty", p(d.path())), b"", WriteOptions::default()).unwrap();
    assert_eq!(c.read_file(&format!("{}/empty", p(d.path()))).unwrap(), b"");
    assert!(String::from_utf8(c.read_file("/proc/self/status").unwrap()).unwrap().contains("Name:"));

    let st = c.stat(p(&f), false).unwrap();
    assert_eq!((st.file_type, st.size, st.mode), ("file", 11, 0o640));
    std::os::unix::fs::symlink("b/c.txt", d.path().join("a/link")).unwrap();
    let st = c.stat(&format!("{}/a/link", p(d.path())), false).unwrap();
    assert_eq!((st.file_type, st.link_target.as_deref()), ("symlink", Some("b/c.txt")));
    assert_eq!(c.stat(&format!("{}/a/link", p(d.path())), true).unwrap().file_type, "file");
    assert!(c.exists(p(&f)).unwrap());
    assert!(!c.exists(&format!("{}/nope", p(d.path()))).unwrap());
    assert!(!c.exists(&format!("{}/nope", p(&f))).unwrap(), "ENOTDIR counts as absent");

    c.mkdir(&format!("{}/x/y/z", p(d.path())), 0o700, true).unwrap();
    c.mkdir(&format!("{}/x/y/z", p(d.path())), 0o700, true).unwrap(); // -p: existing is fine
    assert_eq!(std::fs::metadata(d.path().join("x/y/z")).unwrap().permissions().mode() & 0o7777, 0o700);
    let names: Vec<(String, &str)> =
        c.list_dir(&format!("{}/a", p(d.path()))).unwrap().into_iter().map(|e| (e.name, e.file_type)).collect();
    assert_eq!(names, [("b".to_owned(), "dir"), ("link".to_owned(), "symlink")]);
    c.rename(p(&f), &format!("{}/moved", p(d.path()))).unwrap();
    assert!(!f.exists() && d.path().join("moved").exists());
    c.remove(&format!("{}/moved", p(d.path())), false).unwrap();
    c.remove(&format!("{}/x", p(d.path())), true).unwrap();
    assert!(!d.path().join("x").exists());

    // A directory with many entries comes in several frames.
    let big = d.path().join("big");
    std::fs::create_dir(&big).unwrap();
    for i in 0..20_000 {
        std::fs::write(big.join(format!("file-with-a-longish-name-{i:06}")), b"").unwrap();
    }
    let entries = c.list_dir(p(&big)).unwrap();
    assert_eq!(entries.len(), 20_000);
    assert_eq!(entries[0].name, "file-with-a-longish-name-000000");
}

#[test]
fn errors_carry_errno_codes_and_guest_paths() {
    let a = Agent::spawn();
    let c = &a.client;
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let missing = format!("{}/missing", p(d.path()));
    let code = |r: Result<(), sandbox::SandboxError>| r.unwrap_err().code();
    let e = c.read_file(&missing).unwrap_err();
    assert_eq!(e.code(), "ENOENT");
    assert!(matches!(&e, sandbox::SandboxError::Guest { path: Some(p), .. } if *p == missing), "{e:?}");
    assert!(e.to_string().contains(&missing), "{e}");
    assert_eq!(c.read_file(p(d.path())).unwrap_err().code(), "EISDIR");
    assert_eq!(code(c.write_file(p(d.path()), b"x", WriteOptions::default())), "EISDIR");
    assert_eq!(code(c.write_file(&format!("{}/sub/f", p(&file)), b"x", WriteOptions::default())), "ENOTDIR");
    assert_eq!(code(c.write_file(&format!("{missing}/f"), b"x", WriteOptions::default())), "ENOENT");
    assert_eq!(code(c.mkdir(p(&file), 0o755, false)), "EEXIST");
    assert_eq!(code(c.mkdir(p(d.path()), 0o755, false)), "EEXIST");
    std::fs::create_dir(d.path().join("full")).unwrap();
    std::fs::write(d.path().join("full/x"), b"").unwrap();
    assert_eq!(code(c.remove(&format!("{}/full", p(d.path())), false)), "ENOTEMPTY");
    assert_eq!(code(c.remove(&missing, true)), "ENOENT");
    assert_eq!(code(c.rename(&missing, &format!("{missing}2"))), "ENOENT");
    assert_eq!(c.stat(&missing, false).unwrap_err().code(), "ENOENT");
    assert_eq!(c.list_dir(p(&file)).unwrap_err().code(), "ENOTDIR");
    assert_eq!(c.list_dir(&missing).unwrap_err().code(), "ENOENT");
    // Permission errors, as a user who may not read.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut req = sandbox::ExecRequest::new(["cat", p(&file)]);
    req.user = Some("nobody".into());
    let out = c.exec_collect(&req, Some(Duration::from_secs(10))).unwrap();
    assert_ne!(out.code(), Some(0), "nobody may not read it");
    // Bad paths are refused before anything happens.
    assert_eq!(c.read_file("relative/path").unwrap_err().code(), "E_INVALID_ARGUMENT");
    assert_eq!(code(c.mkdir("", 0o755, true)), "E_INVALID_ARGUMENT");
    assert_eq!(code(c.mkdir(&format!("{}/m", p(d.path())), 0o17777, true)), "E_INVALID_ARGUMENT");
    assert_eq!(code(c.remove("/", true)), "E_INVALID_ARGUMENT");
    assert_eq!(
        c.copy_to_host(&missing, &d.path().join("out"), CopyToHostOptions::default()).unwrap_err().code(),
        "ENOENT"
    );
    assert_eq!(
        c.copy_from_host(&d.path().join("host-missing"), &format!("{}/in", p(d.path()))).unwrap_err().code(),
        "E_HOST_FILE"
    );
    // And the agent still serves.
    c.ping(Duration::from_secs(5)).unwrap();
}

fn tree_fixture(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("data/deep/er")).unwrap();
    std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    std::fs::set_permissions(root.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("data/secret"), b"s3cret").unwrap();
    std::fs::set_permissions(root.join("data/secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(root.join("data/deep/er/blob"), (0..3_000_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>())
        .unwrap();
    std::fs::write(root.join("setuid"), b"").unwrap();
    std::fs::set_permissions(root.join("setuid"), std::fs::Permissions::from_mode(0o4711)).unwrap();
    std::os::unix::fs::symlink("../bin/tool", root.join("data/tool-link")).unwrap();
    std::os::unix::fs::symlink("/does/not/exist", root.join("dangling")).unwrap();
    std::fs::set_permissions(root.join("data/deep"), std::fs::Permissions::from_mode(0o750)).unwrap();
}

/// `(relative path, type, mode, size, link target, content hash)` of every entry.
fn listing(root: &Path) -> Vec<(String, String, u32, u64, String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let (t, link, hash) = if m.file_type().is_symlink() {
                ("l", std::fs::read_link(e.path()).unwrap().display().to_string(), 0)
            } else if m.is_dir() {
                stack.push(e.path());
                ("d", String::new(), 0)
            } else {
                let b = std::fs::read(e.path()).unwrap();
                (
                    "f",
                    String::new(),
                    b.iter().fold(0xcbf29ce484222325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3)),
                )
            };
            out.push((rel, t.to_owned(), m.mode() & 0o7777, if t == "f" { m.len() } else { 0 }, link, hash));
        }
    }
    out.sort();
    out
}

#[test]
fn directory_trees_round_trip_with_modes_and_symlinks() {
    let a = Agent::spawn();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    tree_fixture(&src);
    let guest = d.path().join("guest-side/copy");
    let stats = a.client.copy_from_host(&src, p(&guest)).unwrap();
    assert_eq!(stats.entries, 11, "{stats:?}");
    assert_eq!(stats.bytes, 3_000_000 + 6 + 20);
    let back = d.path().join("host-side/back");
    let keep = CopyToHostOptions { keep_setuid: true, ..Default::default() };
    let stats2 = a.client.copy_to_host(p(&guest), &back, keep).unwrap();
    assert_eq!(stats2, stats);
    assert_eq!(listing(&guest), listing(&src));
    assert_eq!(listing(&back), listing(&src));
    // By default the host drops setuid/setgid bits (the guest kept them: the host is trusted).
    let plain = d.path().join("host-side/plain");
    a.client.copy_to_host(p(&guest), &plain, CopyToHostOptions::default()).unwrap();
    let want: Vec<_> = listing(&src)
        .into_iter()
        .map(|mut e| {
            e.2 &= 0o1777;
            e
        })
        .collect();
    assert_eq!(listing(&plain), want);
    assert_eq!(std::fs::metadata(plain.join("setuid")).unwrap().mode() & 0o7777, 0o711);
    // A single file and a single symlink copy too.
    a.client
        .copy_to_host(&format!("{}/data/secret", p(&guest)), &d.path().join("one"), CopyToHostOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(d.path().join("one")).unwrap(), b"s3cret");
    assert_eq!(std::fs::metadata(d.path().join("one")).unwrap().mode() & 0o7777, 0o600);
    a.client.copy_from_host(&src.join("dangling"), &format!("{}/l2", p(&guest))).unwrap();
    assert_eq!(std::fs::read_link(guest.join("l2")).unwrap(), Path::new("/does/not/exist"));
}

#[test]
fn a_256_mib_file_both_ways_in_bounded_memory() {
    let a = Agent::spawn();
    let d = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..256u64 << 20).map(|i| (i.wrapping_mul(0x9e3779b97f4a7c15) >> 56) as u8).collect();
    let path = d.path().join("big.bin");
    let t = Instant::now();
    a.client.write_file(p(&path), &data, WriteOptions::default()).unwrap();
    let up = t.elapsed();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), data.len() as u64);
    let t = Instant::now();
    let mut s = a.client.open_read(p(&path), 0, None).unwrap();
    let mut got = Vec::with_capacity(data.len());
    let mut peak = 0;
    while let Some(c) = s.read_chunk(Duration::from_secs(30)).unwrap() {
        got.extend_from_slice(&c);
        peak = peak.max(s.buffered_bytes().1);
    }
    let down = t.elapsed();
    assert!(got == data, "the file came back changed");
    let mb = data.len() as f64 / 1e6;
    say(&format!(
        "256 MiB file (debug build): write {:.0} MB/s, read {:.0} MB/s; host read buffer peak {} KiB; agent peak RSS {} KiB",
        mb / up.as_secs_f64(),
        mb / down.as_secs_f64(),
        peak >> 10,
        a.peak_rss_kib()
    ));
    assert!(peak <= (4 << 20) + (256 << 10), "host buffered {peak}");
    assert!(a.peak_rss_kib() < 64 << 10, "agent peak RSS {} KiB", a.peak_rss_kib());
}

#[test]
fn a_failed_write_stream_is_reported_and_the_agent_goes_on() {
    let a = Agent::spawn();
    let d = tempfile::tempdir().unwrap();
    // The source has a file where the destination has a directory: the agent refuses that
    // entry (EISDIR, never a recursive delete) in the middle of the stream, drops the rest of
    // it, and serves on.
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a-first"), vec![1u8; 3 << 20]).unwrap();
    std::fs::write(src.join("keep"), b"file").unwrap();
    std::fs::write(src.join("z-last"), vec![2u8; 3 << 20]).unwrap();
    let dest = d.path().join("dest");
    std::fs::create_dir_all(dest.join("keep")).unwrap();
    std::fs::write(dest.join("keep/precious"), b"1").unwrap();
    let e = a.client.copy_from_host(&src, p(&dest)).unwrap_err();
    assert_eq!(e.code(), "EISDIR", "{e}");
    assert!(e.to_string().contains("keep"), "{e}");
    assert!(dest.join("keep/precious").exists());
    a.client.ping(Duration::from_secs(5)).unwrap();
    assert_eq!(a.client.read_file(p(&dest.join("a-first"))).unwrap().len(), 3 << 20);

    // Host side: a guest symlink is copied as a symlink, never followed.
    let g = d.path().join("guest-evil");
    std::fs::create_dir_all(g.join("sub")).unwrap();
    std::os::unix::fs::symlink("/", g.join("sub/root-link")).unwrap();
    let out = d.path().join("host-out");
    a.client.copy_to_host(p(&g), &out, CopyToHostOptions::default()).unwrap();
    assert_eq!(std::fs::read_link(out.join("sub/root-link")).unwrap(), Path::new("/"));
    a.client.ping(Duration::from_secs(5)).unwrap();
}

#[test]
fn fifos_do_not_block_the_agent() {
    let a = Agent::spawn();
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let t = Instant::now();
    assert_eq!(a.client.write_file(p(&fifo), b"x", WriteOptions::default()).unwrap_err().code(), "ENXIO");
    let r = a.client.read_file(p(&fifo));
    assert!(r.as_ref().map_or(true, |b| b.is_empty()), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    a.client.ping(Duration::from_secs(5)).unwrap();
}

#[test]
fn reads_and_copies_to_the_host_are_bounded() {
    let a = Agent::spawn();
    let c = &a.client;
    let d = tempfile::tempdir().unwrap();
    // An endless file stops at the limit, at once; the guest sends one byte more, no more.
    let t = Instant::now();
    let e = c.read_file_max("/dev/zero", 1 << 20).unwrap_err();
    assert_eq!(e.code(), "E_OUTPUT_LIMIT", "{e}");
    assert!(e.to_string().contains("maxBytes"), "{e}");
    let zero_ms = t.elapsed().as_millis();
    assert!(zero_ms < 5000, "{zero_ms} ms");
    let f = d.path().join("ten");
    std::fs::write(&f, b"0123456789").unwrap();
    assert_eq!(c.read_file_max(p(&f), 10).unwrap(), b"0123456789");
    assert_eq!(c.read_file_max(p(&f), 9).unwrap_err().code(), "E_OUTPUT_LIMIT");
    // A sparse 256 MiB file stays sparse on the host.
    let sparse = d.path().join("sparse");
    let file = std::fs::File::create(&sparse).unwrap();
    file.set_len(256 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"tail", (256 << 20) - 4).unwrap();
    let out = d.path().join("host/sparse");
    let t = Instant::now();
    let st = c.copy_to_host(p(&sparse), &out, CopyToHostOptions { max_bytes: 1 << 20, ..Default::default() }).unwrap();
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!((st.bytes, m.len()), (256 << 20, 256 << 20));
    assert!(m.blocks() * 512 <= 1 << 20, "{} blocks on the host", m.blocks());
    say(&format!(
        "sparse 256 MiB to the host: {} KiB allocated, {} ms; /dev/zero with maxBytes 1 MiB: {zero_ms} ms",
        m.blocks() / 2,
        t.elapsed().as_millis()
    ));
    // Data past maxBytes: E_OUTPUT_LIMIT, and no partial file under the name.
    let big = d.path().join("big");
    std::fs::write(&big, vec![9u8; 3 << 20]).unwrap();
    let out = d.path().join("host/big");
    let e = c.copy_to_host(p(&big), &out, CopyToHostOptions { max_bytes: 1 << 20, ..Default::default() }).unwrap_err();
    assert_eq!(e.code(), "E_OUTPUT_LIMIT", "{e}");
    assert!(std::fs::symlink_metadata(&out).is_err(), "a partial file was left");
    c.ping(Duration::from_secs(5)).unwrap();
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn an_abandoned_read_is_cancelled_and_the_agent_closes_its_descriptor() {
    let a = Agent::spawn();
    assert_ne!(a.ready.features & protocol::features::CANCEL, 0, "the agent takes Cancel");
    let c = &a.client;
    let pid = a.child.id();
    let d = tempfile::tempdir().unwrap();
    let base = fd_count(pid);
    // A stream read one chunk of and dropped (a JS readStream let go): an endless file, which
    // the agent would hold open for good.
    let mut s = c.open_read("/dev/zero", 0, None).unwrap();
    assert!(!s.read_chunk(Duration::from_secs(10)).unwrap().unwrap().is_empty());
    assert_eq!(fd_count(pid), base + 1, "the agent reads /dev/zero");
    drop(s);
    // The agent takes frames in order: once the Pong is back, the Cancel before it was handled.
    c.ping(Duration::from_secs(5)).unwrap();
    assert_eq!(fd_count(pid), base, "the dropped stream's descriptor is still open in the agent");
    // copyToHost stopping at maxBytes: the agent has a 16 MiB file (and its directory) open,
    // with credit for 4 MiB, when the host gives up after 1 MiB.
    let src = d.path().join("tree");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big"), vec![7u8; 16 << 20]).unwrap();
    let out = d.path().join("host-out");
    let e = c.copy_to_host(p(&src), &out, CopyToHostOptions { max_bytes: 1 << 20, ..Default::default() }).unwrap_err();
    assert_eq!(e.code(), "E_OUTPUT_LIMIT", "{e}");
    c.ping(Duration::from_secs(5)).unwrap();
    assert_eq!(fd_count(pid), base, "the abandoned copy's reader is still open in the agent");
    // The session goes on: the same file reads whole, ids and all.
    assert_eq!(c.read_file(p(&src.join("big"))).unwrap().len(), 16 << 20);
    assert_eq!(fd_count(pid), base);
    // A Cancel for an id that is no stream (ended, or never was) is ignored, not answered.
    let stray = c.send(protocol::Message::Cancel(())).unwrap();
    c.ping(Duration::from_secs(5)).unwrap();
    assert!(stray.try_next().unwrap().is_none(), "the agent answered a stray Cancel");
}
