//! Linux errno numbers (x86_64 / generic numbering, the guest's) and their names, so both sides
//! speak of `ENOENT` rather than `2`.

/// `(number, name)` of the errors a guest operation commonly reports.
pub const ERRNOS: &[(i32, &str)] = &[
    (1, "EPERM"),
    (2, "ENOENT"),
    (3, "ESRCH"),
    (4, "EINTR"),
    (5, "EIO"),
    (6, "ENXIO"),
    (7, "E2BIG"),
    (8, "ENOEXEC"),
    (9, "EBADF"),
    (10, "ECHILD"),
    (11, "EAGAIN"),
    (12, "ENOMEM"),
    (13, "EACCES"),
    (14, "EFAULT"),
    (16, "EBUSY"),
    (17, "EEXIST"),
    (18, "EXDEV"),
    (19, "ENODEV"),
    (20, "ENOTDIR"),
    (21, "EISDIR"),
    (22, "EINVAL"),
    (23, "ENFILE"),
    (24, "EMFILE"),
    (25, "ENOTTY"),
    (26, "ETXTBSY"),
    (27, "EFBIG"),
    (28, "ENOSPC"),
    (29, "ESPIPE"),
    (30, "EROFS"),
    (31, "EMLINK"),
    (32, "EPIPE"),
    (36, "ENAMETOOLONG"),
    (38, "ENOSYS"),
    (39, "ENOTEMPTY"),
    (40, "ELOOP"),
    (61, "ENODATA"),
    (75, "EOVERFLOW"),
    (95, "EOPNOTSUPP"),
    (110, "ETIMEDOUT"),
    (122, "EDQUOT"),
];

/// `ENOENT` for 2, ...; `None` for numbers not in [`ERRNOS`].
pub fn name(errno: i32) -> Option<&'static str> {
    ERRNOS.iter().find(|(n, _)| *n == errno).map(|(_, s)| *s)
}

/// 2 for `ENOENT`, ...
pub fn number(name: &str) -> Option<i32> {
    ERRNOS.iter().find(|(_, s)| *s == name).map(|(n, _)| *n)
}

/// Linux `RLIMIT_*` resource numbers by name.
pub const RLIMITS: &[(u32, &str)] = &[
    (0, "RLIMIT_CPU"),
    (1, "RLIMIT_FSIZE"),
    (2, "RLIMIT_DATA"),
    (3, "RLIMIT_STACK"),
    (4, "RLIMIT_CORE"),
    (5, "RLIMIT_RSS"),
    (6, "RLIMIT_NPROC"),
    (7, "RLIMIT_NOFILE"),
    (8, "RLIMIT_MEMLOCK"),
    (9, "RLIMIT_AS"),
    (10, "RLIMIT_LOCKS"),
    (11, "RLIMIT_SIGPENDING"),
    (12, "RLIMIT_MSGQUEUE"),
    (13, "RLIMIT_NICE"),
    (14, "RLIMIT_RTPRIO"),
    (15, "RLIMIT_RTTIME"),
];

/// The number of `RLIMIT_NOFILE` (also without the `RLIMIT_` prefix, any case).
pub fn rlimit_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("RLIMIT_") { upper } else { format!("RLIMIT_{upper}") };
    RLIMITS.iter().find(|(_, s)| *s == full).map(|(n, _)| *n)
}

/// Linux signal numbers (x86_64) by name, without the `SIG` prefix.
pub const SIGNALS: &[(i32, &str)] = &[
    (1, "HUP"),
    (2, "INT"),
    (3, "QUIT"),
    (4, "ILL"),
    (5, "TRAP"),
    (6, "ABRT"),
    (7, "BUS"),
    (8, "FPE"),
    (9, "KILL"),
    (10, "USR1"),
    (11, "SEGV"),
    (12, "USR2"),
    (13, "PIPE"),
    (14, "ALRM"),
    (15, "TERM"),
    (17, "CHLD"),
    (18, "CONT"),
    (19, "STOP"),
    (20, "TSTP"),
    (21, "TTIN"),
    (22, "TTOU"),
    (23, "URG"),
    (24, "XCPU"),
    (25, "XFSZ"),
    (26, "VTALRM"),
    (27, "PROF"),
    (28, "WINCH"),
    (29, "IO"),
    (30, "PWR"),
    (31, "SYS"),
];

/// `"SIGTERM"`, `"TERM"`, `"term"` or `"15"` → 15.
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(_, s)| *s == short).map(|(n, _)| *n)
}

/// `"SIGTERM"` for 15.
pub fn signal_name(n: i32) -> Option<String> {
    SIGNALS.iter().find(|(k, _)| *k == n).map(|(_, s)| format!("SIG{s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_libc_on_this_host() {
        // The host under test is Linux x86_64 too: its libc numbers are the guest's.
        for (n, s) in
            [(2, "ENOENT"), (13, "EACCES"), (21, "EISDIR"), (20, "ENOTDIR"), (17, "EEXIST"), (39, "ENOTEMPTY")]
        {
            assert_eq!(name(n), Some(s));
            assert_eq!(number(s), Some(n));
        }
        assert_eq!(name(9999), None);
        assert_eq!(rlimit_number("RLIMIT_NOFILE"), Some(7));
        assert_eq!(rlimit_number("nofile"), Some(7));
        assert_eq!(rlimit_number("RLIMIT_BOGUS"), None);
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("kill"), Some(9));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("0"), None);
        assert_eq!(signal_number("SIGBOGUS"), None);
        assert_eq!(signal_name(9).as_deref(), Some("SIGKILL"));
    }
}
