//! Read-only views of an image's filesystem as a stack of overlay-form layer directories,
//! without mounting anything: path lookup that honours whiteouts, opaque directories and
//! symlinks inside the image, and `/etc/passwd` / `/etc/group` resolution.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers of an image, top (newest) first.
#[derive(Debug, Clone, Default)]
pub struct LayerStack {
    /// Layer directories, newest first.
    pub top_first: Vec<PathBuf>,
}

/// Normalises an absolute image path into its components (no `.`/`..`, never above `/`).
pub fn clean_components(path: &str) -> Vec<String> {
    rbuild_snapshot::clean_components(Path::new(path))
}

impl LayerStack {
    /// A stack of the given layer directories, newest first.
    pub fn new(top_first: Vec<PathBuf>) -> Self {
        LayerStack { top_first }
    }

    /// Finds the layer file for the exact (already symlink-free) components, honouring
    /// whiteouts and opaque directories.
    fn find_exact(&self, comps: &[String]) -> Option<(PathBuf, fs::Metadata)> {
        rbuild_snapshot::find_in_layers(&self.top_first, comps)
    }

    /// Resolves `path` inside the image (following symlinks in the image, never leaving it),
    /// returning the resolved absolute image path, the backing file and its metadata.
    /// `follow_last` decides whether a symlink in the last component is followed.
    pub fn resolve(
        &self,
        path: &str,
        follow_last: bool,
    ) -> Option<(String, PathBuf, fs::Metadata)> {
        let mut pending: Vec<String> = clean_components(path);
        pending.reverse();
        let mut done: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = pending.pop() {
            done.push(c);
            let (file, md) = self.find_exact(&done)?;
            if md.file_type().is_symlink() && (follow_last || !pending.is_empty()) {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let target = fs::read_link(&file).ok()?;
                done.pop();
                let t = target.to_string_lossy().into_owned();
                let base = if t.starts_with('/') {
                    String::new()
                } else {
                    format!("/{}", done.join("/"))
                };
                let joined = format!("{base}/{t}");
                let mut comps = clean_components(&joined);
                comps.reverse();
                done.clear();
                // Re-walk from the root with the target prefixed to what is left.
                let mut rest: Vec<String> = std::mem::take(&mut pending);
                rest.extend(comps);
                pending = rest;
            }
        }
        let (file, md) = self.find_exact(&done)?;
        Some((format!("/{}", done.join("/")), file, md))
    }

    /// Names in a directory of the image, merged across layers (whiteouts and opaque
    /// directories honoured), sorted. Empty when `path` is not a directory.
    pub fn list_dir(&self, path: &str) -> Vec<String> {
        let Some((resolved, _, md)) = self.resolve(path, true) else {
            return Vec::new();
        };
        if !md.is_dir() {
            return Vec::new();
        }
        let comps = clean_components(&resolved);
        let mut seen = std::collections::BTreeSet::new();
        let mut hidden = std::collections::BTreeSet::new();
        'layers: for layer in &self.top_first {
            let mut dir = layer.clone();
            for c in &comps {
                dir.push(c);
                match fs::symlink_metadata(&dir) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => break 'layers,
                    Err(_) => continue 'layers,
                }
            }
            if let Ok(rd) = fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if seen.contains(&name) || hidden.contains(&name) {
                        continue;
                    }
                    match e.metadata() {
                        Ok(m) if rbuild_snapshot::is_whiteout(&e.path(), &m) => {
                            hidden.insert(name);
                        }
                        _ => {
                            seen.insert(name);
                        }
                    }
                }
            }
            if rbuild_snapshot::is_opaque_path(&dir) {
                break;
            }
        }
        seen.into_iter().collect()
    }

    /// Reads a small file of the image, e.g. `/etc/passwd`.
    pub fn read_file(&self, path: &str) -> Option<Vec<u8>> {
        let (_, file, md) = self.resolve(path, true)?;
        if !md.is_file() {
            return None;
        }
        fs::read(file).ok()
    }

    /// The `HOME` a RUN step of `user` (`USER`'s value; empty: root) gets, as BuildKit sets
    /// it: the user's home directory in the image's `/etc/passwd`, `/` when it has no entry.
    pub fn home_of(&self, user: &str) -> String {
        let name = user.split(':').next().unwrap_or("");
        let name = if name.is_empty() { "0" } else { name };
        let passwd = self
            .read_file("/etc/passwd")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let entry = match name.parse::<u32>() {
            Ok(uid) => find_entry(&passwd, |f| {
                f.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(uid)
            }),
            Err(_) => find_entry(&passwd, |f| f.first() == Some(&name)),
        };
        entry
            .and_then(|f| f.get(5).map(|h| h.to_string()))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".to_string())
    }

    /// Resolves `COPY --chown`/`ADD --chown` as BuildKit does: like [`LayerStack::resolve_user`],
    /// except that a uid given alone is its own gid too (`--chown=1234` is `1234:1234`, as
    /// docker documents), whatever `/etc/passwd` says.
    pub fn resolve_chown(&self, spec: &str) -> Result<(u32, u32), String> {
        match spec.parse::<u32>() {
            Ok(n) => Ok((n, n)),
            Err(_) => self.resolve_user(spec),
        }
    }

    /// Resolves a user (`name` or `uid`) and optional group like runc does with the
    /// image's `/etc/passwd` and `/etc/group`. Returns `(uid, gid)`.
    pub fn resolve_user(&self, spec: &str) -> Result<(u32, u32), String> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let passwd = self
            .read_file("/etc/passwd")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let (uid, primary_gid) = if user.is_empty() {
            (0, 0)
        } else if let Ok(n) = user.parse::<u32>() {
            let gid = find_entry(&passwd, |f| {
                f.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(n)
            })
            .and_then(|f| f.get(3).and_then(|s| s.parse().ok()))
            .unwrap_or(0);
            (n, gid)
        } else {
            let f = find_entry(&passwd, |f| f.first().map(|s| *s == user).unwrap_or(false))
                .ok_or_else(|| {
                    format!("unable to find user {user}: no matching entries in passwd file")
                })?;
            let uid = f
                .get(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad passwd entry for {user}"))?;
            let gid = f
                .get(3)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad passwd entry for {user}"))?;
            (uid, gid)
        };
        let gid = match group {
            None => primary_gid,
            Some(g) if g.parse::<u32>().is_ok() => g.parse().unwrap(),
            Some(g) => {
                let groups = self
                    .read_file("/etc/group")
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let f = find_entry(&groups, |f| f.first().map(|s| *s == g).unwrap_or(false))
                    .ok_or_else(|| {
                        format!("unable to find group {g}: no matching entries in group file")
                    })?;
                f.get(2)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad group entry for {g}"))?
            }
        };
        Ok((uid, gid))
    }
}

fn find_entry<'a>(text: &'a str, pred: impl Fn(&[&'a str]) -> bool) -> Option<Vec<&'a str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && pred(f))
}

/// The file name of a path as a string.
pub fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or(OsStr::new(""))
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mknod_whiteout(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .unwrap();
    }

    #[test]
    fn whiteouts_opaque_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2) = (t.path().join("l1"), t.path().join("l2"));
        fs::create_dir_all(l1.join("etc")).unwrap();
        fs::create_dir_all(l1.join("usr/bin")).unwrap();
        fs::create_dir_all(l1.join("data")).unwrap();
        fs::write(
            l1.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(l1.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        fs::write(l1.join("usr/bin/tool"), "x").unwrap();
        fs::write(l1.join("data/old"), "x").unwrap();
        fs::write(l1.join("gone"), "x").unwrap();
        symlink("usr/bin", l1.join("bin")).unwrap();
        fs::create_dir_all(l2.join("data")).unwrap();
        fs::write(l2.join("data/new"), "x").unwrap();
        xattr_set(&l2.join("data"));
        mknod_whiteout(&l2.join("gone"));
        let s = LayerStack::new(vec![l2.clone(), l1.clone()]);
        assert!(s.resolve("/gone", true).is_none());
        assert!(
            s.resolve("/data/old", true).is_none(),
            "opaque dir hides lower content"
        );
        assert!(s.resolve("/data/new", true).is_some());
        let (p, _, _) = s.resolve("/bin/tool", true).unwrap();
        assert_eq!(p, "/usr/bin/tool");
        assert_eq!(s.resolve_user("app").unwrap(), (1000, 1001));
        assert_eq!(s.resolve_user("app:staff").unwrap(), (1000, 50));
        assert_eq!(s.resolve_user("42:7").unwrap(), (42, 7));
        assert_eq!(
            s.resolve_chown("1000").unwrap(),
            (1000, 1000),
            "uid alone: gid too"
        );
        assert_eq!(
            s.resolve_chown("app").unwrap(),
            (1000, 1001),
            "name: passwd's group"
        );
        assert_eq!(s.home_of("app"), "/app");
        assert_eq!(s.home_of("1000:50"), "/app");
        assert_eq!(s.home_of(""), "/root");
        assert_eq!(s.home_of("4321"), "/");
        assert!(s
            .resolve_user("nobody")
            .unwrap_err()
            .contains("unable to find user nobody"));
    }

    fn xattr_set(p: &Path) {
        rustix::fs::setxattr(
            p,
            "user.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
}
