//! An SPDX 2.3 SBOM of an image's filesystem (predicate type `https://spdx.dev/Document`, as
//! BuildKit's SBOM attestations): Debian packages from dpkg's status, Python distributions
//! from their `.dist-info/METADATA`, npm packages from `node_modules/*/package.json`, and the
//! crates of Rust binaries built with `cargo auditable` (read by the `auditable-info` crate).
//!
//! The SPDX document is written as serde values: `spdx-rs` had its last release in 2023 and
//! models SPDX 2.2's tag-value form; the JSON needed is a few fixed keys per package.

use crate::rootfs::LayerStack;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The SPDX predicate type of in-toto statements.
pub const SPDX_DOCUMENT: &str = "https://spdx.dev/Document";

/// The largest file the scan reads whole (a Rust binary it looks into, a METADATA file).
const MAX_READ: u64 = 256 << 20;

/// One package found in the image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    /// Its ecosystem's name for it.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its package URL.
    pub purl: String,
    /// Where it was found in the image (`/var/lib/dpkg/status`, the dist-info directory, …).
    pub found_in: String,
    /// Its declared license, where the metadata gives one (an SPDX expression or free text).
    pub license: Option<String>,
}

/// Every package the image at `stack` holds, sorted.
pub fn scan(stack: &LayerStack) -> Vec<Package> {
    let mut found = BTreeSet::new();
    found.extend(dpkg(stack));
    let mut walk = Walk {
        stack,
        found: &mut found,
        entries: 0,
    };
    walk.dir("/");
    found.into_iter().collect()
}

/// The Debian packages dpkg lists as installed.
fn dpkg(stack: &LayerStack) -> Vec<Package> {
    let Some(status) = stack.read_file("/var/lib/dpkg/status") else {
        return Vec::new();
    };
    let distro = os_release(stack);
    let text = String::from_utf8_lossy(&status);
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |k: &str| header(stanza, k, ':');
        let (Some(name), Some(version)) = (field("Package"), field("Version")) else {
            continue;
        };
        if !field("Status").is_some_and(|s| s.ends_with(" installed")) {
            continue;
        }
        let arch = field("Architecture").unwrap_or_else(|| "all".into());
        let mut purl = format!("pkg:deb/debian/{name}@{}?arch={arch}", encode(&version));
        if let Some(d) = &distro {
            purl.push_str(&format!("&distro={d}"));
        }
        out.push(Package {
            name,
            version,
            purl,
            found_in: "/var/lib/dpkg/status".into(),
            license: None,
        });
    }
    out
}

/// `debian-12` from `/etc/os-release`, as syft writes the `distro` qualifier.
fn os_release(stack: &LayerStack) -> Option<String> {
    let text = stack
        .read_file("/etc/os-release")
        .or_else(|| stack.read_file("/usr/lib/os-release"))?;
    let text = String::from_utf8_lossy(&text);
    let get = |k: &str| header(&text, k, '=').map(|v| v.trim_matches('"').to_string());
    Some(format!("{}-{}", get("ID")?, get("VERSION_ID")?))
}

/// The value of the first `KEY<sep>value` line of `text` (dpkg's status, a METADATA file's
/// headers, os-release), trimmed.
fn header(text: &str, key: &str, sep: char) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(sep))
            .map(|v| v.trim().to_string())
    })
}

/// Percent-encodes what a purl version may not hold as is (`:` of an epoch, `+`, `~`).
fn encode(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c.to_string(),
            c => format!("%{:02X}", c as u32),
        })
        .collect()
}

/// The walk over the image's tree for Python, npm and Rust packages.
struct Walk<'a> {
    stack: &'a LayerStack,
    found: &'a mut BTreeSet<Package>,
    entries: usize,
}

impl Walk<'_> {
    fn dir(&mut self, path: &str) {
        for name in self.stack.list_dir(path) {
            self.entries += 1;
            let child = if path == "/" {
                format!("/{name}")
            } else {
                format!("{path}/{name}")
            };
            if path == "/" && matches!(name.as_str(), "proc" | "sys" | "dev") {
                continue;
            }
            let Some((_, file, md)) = self.stack.resolve(&child, false) else {
                continue;
            };
            if md.is_dir() {
                if name.ends_with(".dist-info") {
                    self.python(&child);
                } else if name == "node_modules" {
                    self.npm(&child);
                }
                self.dir(&child);
            } else if md.is_file()
                && std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o111 != 0
                && md.len() > 64
                && md.len() <= MAX_READ
            {
                self.rust(&child, &file);
            }
        }
    }

    /// A Python distribution: `Name`, `Version` and `License` of its METADATA.
    fn python(&mut self, dir: &str) {
        let Some(meta) = self.stack.read_file(&format!("{dir}/METADATA")) else {
            return;
        };
        let text = String::from_utf8_lossy(&meta);
        // The headers end at the first empty line (the description follows).
        let head = text.split("\n\n").next().unwrap_or("");
        let get = |k: &str| header(head, k, ':');
        let (Some(name), Some(version)) = (get("Name"), get("Version")) else {
            return;
        };
        // PEP 503 normalisation, as the pypi purl type asks.
        let norm: String = name
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c == '_' || c == '.' { '-' } else { c })
            .collect();
        self.found.insert(Package {
            purl: format!("pkg:pypi/{norm}@{}", encode(&version)),
            name,
            version,
            found_in: dir.to_string(),
            license: get("License-Expression").or_else(|| get("License")),
        });
    }

    /// The packages directly under a `node_modules` (`@scope/name` too); deeper ones are
    /// found when the walk reaches their own `node_modules`.
    fn npm(&mut self, dir: &str) {
        for name in self.stack.list_dir(dir) {
            let pkgs: Vec<String> = if name.starts_with('@') {
                self.stack
                    .list_dir(&format!("{dir}/{name}"))
                    .into_iter()
                    .map(|n| format!("{name}/{n}"))
                    .collect()
            } else {
                vec![name]
            };
            for p in pkgs {
                let path = format!("{dir}/{p}/package.json");
                let Some(bytes) = self.stack.read_file(&path) else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
                    continue;
                };
                let (Some(name), Some(version)) = (v["name"].as_str(), v["version"].as_str())
                else {
                    continue;
                };
                let purl_name = match name.split_once('/') {
                    Some((scope, n)) => format!("{}/{n}", scope.replace('@', "%40")),
                    None => name.to_string(),
                };
                self.found.insert(Package {
                    purl: format!("pkg:npm/{purl_name}@{}", encode(version)),
                    name: name.to_string(),
                    version: version.to_string(),
                    found_in: path,
                    license: v["license"].as_str().map(str::to_string),
                });
            }
        }
    }

    /// The crates `cargo auditable` recorded in an executable.
    fn rust(&mut self, path: &str, file: &std::path::Path) {
        let mut magic = [0u8; 4];
        let is_elf = std::fs::File::open(file)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\x7fELF";
        if !is_elf {
            return;
        }
        let limits = auditable_info::Limits {
            input_file_size: MAX_READ as usize,
            ..Default::default()
        };
        let Ok(info) = auditable_info::audit_info_from_file(file, limits) else {
            return; // not built with cargo auditable
        };
        for p in info.packages {
            let version = p.version.to_string();
            self.found.insert(Package {
                purl: format!("pkg:cargo/{}@{}", p.name, encode(&version)),
                name: p.name,
                version,
                found_in: path.to_string(),
                license: None,
            });
        }
    }
}

/// The SPDX 2.3 document of `packages` found in the image `name` (its tags, or its config
/// digest), made at `created` (RFC 3339); `namespace_seed` makes the document namespace
/// unique to this image and content.
pub fn spdx(name: &str, namespace_seed: &str, created: &str, packages: &[Package]) -> Value {
    let pkgs: Vec<Value> = packages
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "SPDXID": format!("SPDXRef-Package-{i}"),
                "name": p.name,
                "versionInfo": p.version,
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": false,
                "licenseConcluded": "NOASSERTION",
                "licenseDeclared": p.license.as_deref().filter(|l| is_spdx_expression(l)).unwrap_or("NOASSERTION"),
                "copyrightText": "NOASSERTION",
                "sourceInfo": format!("found in {}", p.found_in),
                "externalRefs": [{
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": p.purl,
                }],
            })
        })
        .collect();
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    relationships.extend((0..packages.len()).map(|i| {
        json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": format!("SPDXRef-Package-{i}"),
        })
    }));
    let mut all = vec![json!({
        "SPDXID": "SPDXRef-Image",
        "name": name,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "CONTAINER",
    })];
    all.extend(pkgs);
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": format!("urn:rbuild:spdx:{namespace_seed}"),
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: rbuild-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": all,
        "relationships": relationships,
    })
}

/// Whether a declared license is a valid SPDX license expression (by the `spdx` crate, over
/// the SPDX license list); free text ("BSD License") is left as NOASSERTION instead of being
/// written where SPDX expects an expression.
fn is_spdx_expression(l: &str) -> bool {
    spdx::Expression::parse(l.trim()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack_with(files: &[(&str, &str)]) -> (tempfile::TempDir, LayerStack) {
        let d = tempfile::tempdir().unwrap();
        for (p, c) in files {
            let path = d.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, c).unwrap();
        }
        let s = LayerStack::new(vec![d.path().to_path_buf()]);
        (d, s)
    }

    #[test]
    fn finds_debian_python_and_npm_packages() {
        let (_d, s) = stack_with(&[
            (
                "/var/lib/dpkg/status",
                "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u4\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n",
            ),
            ("/etc/os-release", "ID=debian\nVERSION_ID=\"12\"\n"),
            (
                "/usr/lib/python3/dist-packages/Foo_Bar-1.0.dist-info/METADATA",
                "Metadata-Version: 2.1\nName: Foo_Bar\nVersion: 1.0\nLicense: MIT\n\nName: not-this\n",
            ),
            (
                "/app/node_modules/@scope/pkg/package.json",
                r#"{"name": "@scope/pkg", "version": "2.0.0", "license": "Apache-2.0"}"#,
            ),
            ("/app/node_modules/left-pad/package.json", r#"{"name": "left-pad", "version": "1.3.0"}"#),
        ]);
        let found = scan(&s);
        let purls: Vec<&str> = found.iter().map(|p| p.purl.as_str()).collect();
        assert!(
            purls.contains(&"pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12"),
            "{purls:?}"
        );
        assert!(purls.contains(&"pkg:pypi/foo-bar@1.0"), "{purls:?}");
        assert!(purls.contains(&"pkg:npm/%40scope/pkg@2.0.0"), "{purls:?}");
        assert!(purls.contains(&"pkg:npm/left-pad@1.3.0"), "{purls:?}");
        assert!(
            !purls.iter().any(|p| p.contains("gone")),
            "only installed packages"
        );
        assert_eq!(found.len(), 4);
        let doc = spdx("img", "x", "2023-11-14T22:13:20Z", &found);
        assert_eq!(doc["packages"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn only_spdx_expressions_are_declared() {
        assert!(is_spdx_expression("MIT"));
        assert!(is_spdx_expression("(MIT OR Apache-2.0) AND BSD-3-Clause"));
        assert!(is_spdx_expression(
            "GPL-2.0-or-later WITH Classpath-exception-2.0"
        ));
        assert!(!is_spdx_expression("BSD License"));
        assert!(!is_spdx_expression(""));
    }
}
