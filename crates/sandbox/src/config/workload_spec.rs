//! A workload's spec from its configuration (a MicroVm's `execPath`, `args`, `env`,
//! `workdirPath`, `rlimits`) and its size limits: here, below `crate::workload`, because config
//! validation checks them too (and so config imports nothing above it).

use protocol::Rlimit;
use protocol::WorkloadSpec;

use super::{EnvPair, LinuxRlimit, MicroVmConfig};
use crate::error::{Result, SandboxError};

/// Largest workload spec sent over the control channel (`StartWorkload`: its wire encoding, the
/// frame's payload): well inside the 1 MiB frame cap, and about what `execve` takes for argv
/// and env together anyway (each string at most 128 KiB), so no real workload meets it.
pub const MAX_SPEC_BYTES: usize = 256 << 10;
const _: () = assert!(MAX_SPEC_BYTES < protocol::MAX_PAYLOAD);
/// Longest `microcell.exec=` word, for the one path that still puts the spec on the kernel
/// command line: a MicroVm booted straight on the VMM (a kernel and `execPath`), which has no
/// control channel. x86 Linux keeps 2047 bytes of command line, and the VMM's own options
/// (console, virtio-mmio devices) need the rest.
pub const MAX_SPEC_WORD: usize = 1400;

fn invalid(m: String) -> SandboxError {
    SandboxError::InvalidArgument(m)
}

/// A spec from its parts, as the MicroVm config has them: `env` as `KEY=VALUE`, `rlimits` as
/// `RLIMIT_NOFILE=1024:1024`.
pub fn spec_from_parts(
    exec_path: &str,
    args: &[String],
    env: &[String],
    workdir: Option<&str>,
    rlimits: &[String],
) -> Result<WorkloadSpec> {
    if exec_path.is_empty() {
        return Err(invalid("workload: execPath is empty".into()));
    }
    let mut argv = vec![exec_path.to_owned()];
    argv.extend(args.iter().cloned());
    let env = env
        .iter()
        .map(|e| EnvPair::parse(e).map(|p| (p.key, p.value)).map_err(|e| invalid(format!("workload: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let rlimits = rlimits
        .iter()
        .map(|r| {
            LinuxRlimit::parse(r)
                .map(|l| Rlimit { resource: l.resource, soft: l.soft, hard: l.hard })
                .map_err(|e| invalid(format!("workload: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = WorkloadSpec { argv, env, cwd: workdir.map(str::to_owned), rlimits, user: None };
    check_spec(&spec)?;
    Ok(spec)
}

/// The workload of a MicroVm configuration: `None` without `execPath`.
pub fn spec_from_microvm_config(c: &MicroVmConfig) -> Result<Option<WorkloadSpec>> {
    let Some(exec) = &c.exec_path else { return Ok(None) };
    spec_from_parts(exec, &c.args, &c.env, c.workdir_path.as_deref(), &c.rlimits).map(Some)
}

/// Refuses a spec larger than a `StartWorkload` request carries ([`MAX_SPEC_BYTES`]).
pub fn check_spec(spec: &WorkloadSpec) -> Result<()> {
    let mut bytes = Vec::new();
    protocol::wire::Wire::put(spec, &mut bytes);
    if bytes.len() > MAX_SPEC_BYTES {
        return Err(invalid(format!(
            "workload: execPath, args, env and workdir take {} bytes, more than the {} KiB the control channel's StartWorkload request carries: \
             shorten them, or put the command and its environment in a script on the root disk and run that",
            bytes.len(),
            MAX_SPEC_BYTES >> 10
        )));
    }
    Ok(())
}

/// The `microcell.exec=` word of a spec, refused over [`MAX_SPEC_WORD`] bytes.
pub fn cmdline_word(spec: &WorkloadSpec) -> Result<String> {
    check_spec(spec)?;
    let word = spec.to_cmdline_word();
    if word.len() > MAX_SPEC_WORD {
        return Err(invalid(format!(
            "workload: execPath, args, env and workdir take {} bytes as microcell.exec= on the kernel command line, more than the {MAX_SPEC_WORD} it has room for \
             (a MicroVm booted on the VMM with a kernel and execPath has no control channel, so its workload goes there): \
             shorten them, put the command in a script on the guest's disk and run that, or boot it with rootfs.disk on a sandbox engine, \
             whose workload goes over the control channel (up to {} KiB)",
            word.len(),
            MAX_SPEC_BYTES >> 10
        )));
    }
    Ok(word)
}

/// The kernel command line of `base` plus the workload word: only for a MicroVm booted on the
/// VMM without a control channel (`MicroVmConfig::to_vm_config`), where nothing else can carry
/// the spec; workload VMs on an engine get it over the channel.
pub fn cmdline_with_spec(base: &str, spec: &WorkloadSpec) -> Result<String> {
    Ok(with_word(base, &cmdline_word(spec)?))
}

/// `base` plus the `microcell.exec=` word.
fn with_word(base: &str, word: &str) -> String {
    if base.trim().is_empty() {
        word.to_owned()
    } else {
        format!("{} {word}", base.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_from_config_parts_and_their_limits() {
        let s = spec_from_parts(
            "/bin/sh",
            &["-c".into(), "echo \"$A\" 'b c'".into()],
            &["A=x y=z".into()],
            Some("/tmp"),
            &["RLIMIT_NOFILE=1024:1024".into()],
        )
        .unwrap();
        assert_eq!(s.argv, ["/bin/sh", "-c", "echo \"$A\" 'b c'"]);
        assert_eq!(s.env, [("A".to_owned(), "x y=z".to_owned())]);
        assert_eq!(s.rlimits, [Rlimit { resource: 7, soft: 1024, hard: 1024 }]);
        let line = cmdline_with_spec("console=ttyS0", &s).unwrap();
        assert!(line.starts_with("console=ttyS0 microcell.exec=") && !line[14..].contains(' '));
        assert_eq!(spec_from_parts("", &[], &[], None, &[]).unwrap_err().code(), "E_INVALID_ARGUMENT");
        assert_eq!(
            spec_from_parts("/x", &[], &["NOEQUALS".into()], None, &[]).unwrap_err().code(),
            "E_INVALID_ARGUMENT"
        );
        assert_eq!(
            spec_from_parts("/x", &[], &[], None, &["RLIMIT_BOGUS=1:1".into()]).unwrap_err().code(),
            "E_INVALID_ARGUMENT"
        );
        // Over the channel a spec may be far longer than a command line holds (the env of a
        // real program: a few KiB); past MAX_SPEC_BYTES it is refused, naming the channel.
        let long =
            spec_from_parts("/x", &["a".repeat(2000)], &["K=".to_owned() + &"v".repeat(8000)], None, &[]).unwrap();
        let e = cmdline_with_spec("console=ttyS0", &long).unwrap_err();
        assert_eq!(e.code(), "E_INVALID_ARGUMENT");
        assert!(e.to_string().contains("kernel command line") && e.to_string().contains("no control channel"), "{e}");
        let max = spec_from_parts("/x", &["a".repeat(MAX_SPEC_BYTES - 64)], &[], None, &[]).unwrap();
        assert!(cmdline_with_spec("", &max).is_err());
        let e = spec_from_parts("/x", &["a".repeat(MAX_SPEC_BYTES)], &[], None, &[]).unwrap_err();
        assert_eq!(e.code(), "E_INVALID_ARGUMENT");
        assert!(e.to_string().contains("256 KiB the control channel"), "{e}");
        assert!(!e.to_string().contains("kernel command line"), "{e}");
        let c =
            MicroVmConfig { exec_path: Some("/bin/echo".into()), args: vec!["hi there".into()], ..Default::default() };
        assert_eq!(spec_from_microvm_config(&c).unwrap().unwrap().argv, ["/bin/echo", "hi there"]);
        assert_eq!(spec_from_microvm_config(&MicroVmConfig::default()).unwrap(), None);
    }
}
