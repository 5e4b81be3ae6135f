//! The boot workload: what a VM runs as its one job when the kernel command line carries
//! `microcell.exec=<spec>`, and the console line that reports how it ended.
//!
//! The spec is the [`WorkloadSpec`] in the wire encoding, written as base64url without padding:
//! one command-line word of `[A-Za-z0-9_-]`, so arguments and values with spaces, quotes, `=`
//! or any UTF-8 survive the kernel's command-line parsing unchanged. (The kernel keeps
//! `microcell.*` words to itself: a word with a `.` is never passed to init as an argument or
//! an environment variable.) x86 Linux reads at most 2047 bytes of command line: a spec must
//! fit what is left of it; [`WorkloadSpec::to_cmdline_word`] gives the exact length.
//!
//! The agent prints one final line on the console when the workload ended, whether or not a
//! host listens on the control channel ([`status_line`] / [`parse_status_line`]):
//! ```text
//! microcell-workload-exit: exited code=3 duration_ns=1234567
//! microcell-workload-exit: signaled signal=9 duration_ns=1234567
//! microcell-workload-exit: error errno=2 name=ENOENT path=L2Jpbi9ub3Bl message=cannot run /bin/nope: No such file or directory
//! ```
//! (`path` is base64url, `-` when there is none; the message runs to the end of the line.)

use crate::messages::{ErrorCode, ErrorMsg, WorkloadExit, WorkloadSpec};
use crate::wire::{Reader, Wire};

/// The kernel command-line key of the spec.
pub const CMDLINE_KEY: &str = "microcell.exec";
/// The console line's prefix.
pub const STATUS_PREFIX: &str = "microcell-workload-exit: ";

impl WorkloadSpec {
    /// `microcell.exec=<base64url>`.
    pub fn to_cmdline_word(&self) -> String {
        let mut b = Vec::new();
        self.put(&mut b);
        format!("{CMDLINE_KEY}={}", base64url_encode(&b))
    }

    /// The spec from the value of `microcell.exec=`.
    pub fn from_cmdline_value(v: &str) -> Result<WorkloadSpec, String> {
        let bytes = base64url_decode(v).ok_or_else(|| format!("{CMDLINE_KEY}= is not base64url"))?;
        let mut r = Reader::new(&bytes);
        let spec = WorkloadSpec::get(&mut r).map_err(|e| format!("{CMDLINE_KEY}= does not decode: {e}"))?;
        r.finish().map_err(|e| format!("{CMDLINE_KEY}= does not decode: {e}"))?;
        if spec.argv.is_empty() || spec.argv[0].is_empty() {
            return Err(format!("{CMDLINE_KEY}= has no program"));
        }
        Ok(spec)
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub fn base64url_encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Strict: no padding, no other characters, no non-zero bits left over.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| B64.iter().position(|&x| x == c).map(|p| p as u32);
    let s = s.as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    for c in s.chunks(4) {
        let mut n = 0u32;
        for (i, &ch) in c.iter().enumerate() {
            n |= val(ch)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = c.len() - 1;
        if bytes[keep..].iter().any(|&b| b != 0) && c.len() < 4 {
            return None;
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Some(out)
}

/// The console line for `exit` (no newline).
pub fn status_line(exit: &WorkloadExit) -> String {
    match (&exit.error, exit.code, exit.signal) {
        (Some(e), _, _) => format!(
            "{STATUS_PREFIX}error errno={} name={} path={} message={}",
            e.errno,
            crate::errno::name(e.errno).unwrap_or("-"),
            e.path.as_deref().map_or("-".to_owned(), |p| base64url_encode(p.as_bytes())),
            e.message.replace(['\n', '\r'], " ")
        ),
        (None, _, Some(sig)) => format!("{STATUS_PREFIX}signaled signal={sig} duration_ns={}", exit.duration_ns),
        (None, code, None) => {
            format!("{STATUS_PREFIX}exited code={} duration_ns={}", code.unwrap_or(-1), exit.duration_ns)
        }
    }
}

/// The status in a console line (anywhere in it), if it is one.
pub fn parse_status_line(line: &str) -> Option<WorkloadExit> {
    let rest = &line[line.find(STATUS_PREFIX)? + STATUS_PREFIX.len()..];
    let rest = rest.trim_end_matches(['\r', '\n']);
    let (what, fields) = rest.split_once(' ')?;
    let field = |name: &str| -> Option<&str> {
        fields.split(' ').find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    match what {
        "exited" => Some(WorkloadExit {
            code: Some(field("code")?.parse().ok()?),
            signal: None,
            duration_ns: field("duration_ns")?.parse().ok()?,
            error: None,
        }),
        "signaled" => Some(WorkloadExit {
            code: None,
            signal: Some(field("signal")?.parse().ok()?),
            duration_ns: field("duration_ns")?.parse().ok()?,
            error: None,
        }),
        "error" => {
            let message = &fields[fields.find("message=")? + "message=".len()..];
            let head = &fields[..fields.find("message=")?];
            let field =
                |name: &str| head.split(' ').find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')));
            let path = match field("path")? {
                "-" => None,
                p => Some(String::from_utf8(base64url_decode(p)?).ok()?),
            };
            Some(WorkloadExit {
                code: None,
                signal: None,
                duration_ns: 0,
                error: Some(ErrorMsg {
                    code: ErrorCode::IO,
                    errno: field("errno")?.parse().ok()?,
                    message: message.to_owned(),
                    path,
                }),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Rlimit;

    #[test]
    fn base64url_round_trips_and_is_strict() {
        for n in 0..70 {
            let b: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = base64url_encode(&b);
            assert!(s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            assert_eq!(base64url_decode(&s).unwrap(), b);
        }
        assert_eq!(base64url_encode(b"hi?"), "aGk_");
        assert_eq!(base64url_decode("a"), None);
        assert_eq!(base64url_decode("aGk="), None);
        assert_eq!(base64url_decode("aGl"), None, "non-zero leftover bits");
        assert_eq!(base64url_decode("aGk+"), None);
    }

    #[test]
    fn spec_survives_the_command_line() {
        let spec = WorkloadSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo \"a  b\" 'c' $X; exit 3".into(), "".into(), "é😀=".into()],
            env: vec![("X".into(), "with spaces \" and '".into())],
            cwd: Some("/tmp/a b".into()),
            rlimits: vec![
                Rlimit { resource: 7, soft: 1024, hard: 1024 },
                Rlimit { resource: 4, soft: 0, hard: u64::MAX },
            ],
            user: Some("nobody".into()),
        };
        let word = spec.to_cmdline_word();
        assert!(!word.contains(' ') && word.starts_with("microcell.exec="));
        let value = word.split_once('=').unwrap().1;
        assert_eq!(WorkloadSpec::from_cmdline_value(value).unwrap(), spec);
        assert!(WorkloadSpec::from_cmdline_value("!!").is_err());
        assert!(WorkloadSpec::from_cmdline_value(&WorkloadSpec::default().to_cmdline_word()[15..]).is_err());
    }

    #[test]
    fn status_lines_round_trip() {
        let cases = [
            WorkloadExit { code: Some(3), signal: None, duration_ns: 12, error: None },
            WorkloadExit { code: None, signal: Some(9), duration_ns: 1 << 40, error: None },
            WorkloadExit {
                code: None,
                signal: None,
                duration_ns: 0,
                error: Some(ErrorMsg {
                    code: ErrorCode::IO,
                    errno: 2,
                    message: "cannot run /bin/no pe: No such file message=x".into(),
                    path: Some("/bin/no pe".into()),
                }),
            },
        ];
        for c in cases {
            let line = status_line(&c);
            assert!(!line.contains('\n'));
            assert_eq!(parse_status_line(&format!("[  1.0] {line}\r\n")), Some(c), "{line}");
        }
        assert_eq!(parse_status_line("microcell-workload-exit: bogus"), None);
        assert_eq!(parse_status_line("nothing here"), None);
    }
}
