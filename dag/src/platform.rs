//! Target platforms (`os/arch[/variant]`), parsed once and normalised as containerd's
//! `platforms.Normalize` does, so `linux/aarch64`, `arm64` and `linux/arm64/v8` are one
//! platform and an image index entry is matched by value, not by spelling.
//!
//! Written here rather than taken from a crate: `oci-spec`'s `Platform` is a plain record
//! with no parsing or normalisation, and no maintained crate ports containerd's rules.

use std::fmt;

/// A platform as OCI image indexes name one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture, in Go's names (`amd64`, `arm64`, `arm`, `386`, ...).
    pub arch: String,
    /// CPU variant (`v7` for `arm`), `None` where the architecture's default applies.
    pub variant: Option<String>,
}

/// A platform string that names no platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("platform {text:?}: {reason}")]
pub struct PlatformError {
    /// What was given.
    pub text: String,
    /// Why it is refused.
    pub reason: &'static str,
}

const OSES: &[&str] = &[
    "linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos", "aix",
    "android", "ios", "plan9", "js", "wasip1",
];

impl Platform {
    /// Parses `os/arch[/variant]`, `arch` (on Linux) or `os` (on this machine's architecture),
    /// normalised.
    pub fn parse(text: &str) -> Result<Platform, PlatformError> {
        let bad = |reason| PlatformError {
            text: text.to_string(),
            reason,
        };
        let lower = text.trim().to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("want OS/ARCH[/VARIANT]"));
        }
        if parts.iter().any(|p| {
            !p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.')
        }) {
            return Err(bad(
                "only letters, digits, '_', '-' and '.' between the slashes",
            ));
        }
        let (os, arch, variant) = match parts.as_slice() {
            [one] if OSES.contains(&normal_os(one)) => {
                let host = Platform::host();
                (normal_os(one).to_string(), host.arch, host.variant)
            }
            [one] => ("linux".to_string(), one.to_string(), None),
            [os, arch] => (normal_os(os).to_string(), arch.to_string(), None),
            [os, arch, variant] => (
                normal_os(os).to_string(),
                arch.to_string(),
                Some(variant.to_string()),
            ),
            _ => return Err(bad("want OS/ARCH[/VARIANT]")),
        };
        let (arch, variant) = normal_arch(&arch, variant.as_deref());
        Ok(Platform { os, arch, variant })
    }

    /// The machine rbuild runs on.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            "powerpc64" => ("ppc64le", None),
            "x86" => ("386", None),
            _ => ("amd64", None),
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: variant.map(str::to_string),
        }
    }

    /// Whether an image of `other` runs here without emulation: the same OS and architecture
    /// (386 on amd64 or arm on arm64, which some kernels run natively, count as foreign).
    pub fn same_machine(&self, other: &Platform) -> bool {
        self.os == other.os && self.arch == other.arch
    }

    /// Whether an index entry naming `os`, `arch` and `variant` is this platform.
    pub fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        let (a, v) = normal_arch(&arch.to_ascii_lowercase(), variant);
        normal_os(&os.to_ascii_lowercase()) == self.os && a == self.arch && v == self.variant
    }

    /// The directory name buildx gives this platform's files in a multi-platform local
    /// output (`linux_arm64`, `linux_arm_v7`).
    pub fn dir_name(&self) -> String {
        self.to_string().replace('/', "_")
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::parse(s)
    }
}

fn normal_os(os: &str) -> &str {
    match os {
        "macos" => "darwin",
        o => o,
    }
}

/// containerd's `normalizeArch`: Go's architecture names, and the variant an architecture
/// implies made explicit (arm) or dropped (amd64 v1, arm64 v8).
fn normal_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let variant = variant.map(str::to_ascii_lowercase);
    let v = variant.as_deref();
    let (a, v): (&str, Option<&str>) = match arch {
        "i386" => ("386", None),
        "x86_64" | "x86-64" | "amd64" => ("amd64", v.filter(|v| *v != "v1")),
        "aarch64" | "arm64" => ("arm64", v.filter(|v| !matches!(*v, "8" | "v8"))),
        "armhf" => ("arm", Some("v7")),
        "armel" => ("arm", Some("v6")),
        "arm" => (
            "arm",
            Some(match v {
                None | Some("7") => "v7",
                Some("5") => "v5",
                Some("6") => "v6",
                Some("8") => "v8",
                Some(other) => other,
            }),
        ),
        other => (other, v),
    };
    (a.to_string(), v.map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        Platform::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_as_containerd() {
        assert_eq!(p("linux/amd64"), "linux/amd64");
        assert_eq!(p("linux/x86_64"), "linux/amd64");
        assert_eq!(p("linux/amd64/v1"), "linux/amd64");
        assert_eq!(p("linux/amd64/v3"), "linux/amd64/v3");
        assert_eq!(p("linux/aarch64"), "linux/arm64");
        assert_eq!(p("linux/arm64/v8"), "linux/arm64");
        assert_eq!(p("linux/arm"), "linux/arm/v7");
        assert_eq!(p("linux/armhf"), "linux/arm/v7");
        assert_eq!(p("linux/arm/6"), "linux/arm/v6");
        assert_eq!(p("arm64"), "linux/arm64");
        assert_eq!(p("Linux/ARM64"), "linux/arm64");
        assert_eq!(p("linux/i386"), "linux/386");
        assert_eq!(p("linux"), Platform::host().to_string());
    }

    #[test]
    fn refuses_what_names_no_platform() {
        for bad in [
            "",
            "linux/",
            "/amd64",
            "linux//amd64",
            "a/b/c/d",
            "linux/am d64",
        ] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(p(" linux/arm64"), "linux/arm64", "a space after a comma");
    }

    #[test]
    fn matches_index_entries_by_value() {
        let arm64 = Platform::parse("linux/arm64").unwrap();
        assert!(arm64.matches("linux", "arm64", None));
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        assert!(!arm64.matches("linux", "amd64", None));
        let armv7 = Platform::parse("linux/arm/v7").unwrap();
        assert!(armv7.matches("linux", "arm", Some("v7")));
        assert!(armv7.matches("linux", "arm", None), "arm means v7");
        assert!(!armv7.matches("linux", "arm", Some("v6")));
        assert_eq!(armv7.dir_name(), "linux_arm_v7");
    }
}
