//! Emulation of foreign architectures for RUN steps: the kernel's binfmt_misc hands their
//! ELF binaries to a qemu-user interpreter (Debian's `qemu-user-static`). Only entries with
//! the `F` (fix binary) flag work in a step: the kernel opens the interpreter when it is
//! registered, so it need not exist in the step's root.

use std::path::{Path, PathBuf};

/// Where the kernel's binfmt_misc is mounted.
pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// How to get emulation, for messages.
pub const BINFMT_FIX: &str = "apt-get install qemu-user-static (it registers its interpreters with the F flag), after `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc` where binfmt_misc is not mounted";

/// A registered interpreter for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulator {
    /// The binfmt_misc entry (`qemu-aarch64`).
    pub name: String,
    /// The interpreter's path as registered.
    pub interpreter: PathBuf,
}

/// qemu's name for an OCI architecture (`arm64` → `aarch64`), as Debian's binfmt entries
/// (`qemu-<name>`) use it.
pub fn qemu_arch(oci_arch: &str) -> &str {
    match oci_arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "386" => "i386",
        "mips64le" => "mips64el",
        "mipsle" => "mipsel",
        other => other,
    }
}

/// The interpreter that runs `oci_arch` binaries in a RUN step, from the binfmt_misc at
/// `dir`; an error says what is missing and how to get it.
pub fn emulator_for(dir: &Path, oci_arch: &str) -> Result<Emulator, String> {
    let name = format!("qemu-{}", qemu_arch(oci_arch));
    if !dir.join("status").exists() {
        return Err(format!(
            "binfmt_misc is not mounted at {}, so no {oci_arch} binary can run here; fix: {BINFMT_FIX}",
            dir.display()
        ));
    }
    let text = std::fs::read_to_string(dir.join(&name)).map_err(|_| {
        format!(
            "no binfmt_misc entry {name} in {}: {oci_arch} binaries cannot run here; fix: {BINFMT_FIX}",
            dir.display()
        )
    })?;
    let entry = parse_entry(&text);
    if !entry.enabled {
        return Err(format!(
            "binfmt_misc entry {name} is disabled; fix: echo 1 > {}",
            dir.join(&name).display()
        ));
    }
    if !entry.flags.contains('F') {
        return Err(format!(
            "binfmt_misc entry {name} lacks the F (fix binary) flag, so its interpreter {} would have to exist inside each step's root; fix: register it with F, as {BINFMT_FIX}",
            entry.interpreter.display()
        ));
    }
    Ok(Emulator {
        name,
        interpreter: entry.interpreter,
    })
}

struct Entry {
    enabled: bool,
    interpreter: PathBuf,
    flags: String,
}

fn parse_entry(text: &str) -> Entry {
    let mut e = Entry {
        enabled: false,
        interpreter: PathBuf::new(),
        flags: String::new(),
    };
    for line in text.lines() {
        if line.trim() == "enabled" {
            e.enabled = true;
        } else if let Some(p) = line.strip_prefix("interpreter ") {
            e.interpreter = PathBuf::from(p.trim());
        } else if let Some(f) = line.strip_prefix("flags:") {
            e.flags = f.trim().to_string();
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("status"), "enabled\n").unwrap();
        for (n, t) in entries {
            std::fs::write(d.path().join(n), t).unwrap();
        }
        d
    }

    #[test]
    fn finds_an_entry_with_the_fix_binary_flag() {
        let d = dir_with(&[(
            "qemu-aarch64",
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\noffset 0\nmagic 7f454c46\n",
        )]);
        let e = emulator_for(d.path(), "arm64").unwrap();
        assert_eq!(e.name, "qemu-aarch64");
        assert_eq!(
            e.interpreter,
            Path::new("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")
        );
    }

    #[test]
    fn says_what_is_missing() {
        let none = tempfile::tempdir().unwrap();
        assert!(emulator_for(none.path(), "arm64")
            .unwrap_err()
            .contains("not mounted"));
        let d = dir_with(&[
            ("qemu-aarch64", "enabled\ninterpreter /q\nflags: PO\n"),
            ("qemu-riscv64", "disabled\ninterpreter /q\nflags: F\n"),
        ]);
        assert!(emulator_for(d.path(), "arm64")
            .unwrap_err()
            .contains("F (fix binary)"));
        assert!(emulator_for(d.path(), "riscv64")
            .unwrap_err()
            .contains("disabled"));
        let e = emulator_for(d.path(), "s390x").unwrap_err();
        assert!(e.contains("no binfmt_misc entry qemu-s390x") && e.contains("qemu-user-static"));
    }
}
