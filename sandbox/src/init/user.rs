//! Who the command runs as and what it runs: USER resolved in the image's passwd and group
//! files, the program found on the step's PATH.

use super::*;

pub(super) fn find_executable(name: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path.split(':')
        .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Resolves `USER` in the (new) root's /etc/passwd and /etc/group, like runc.
pub fn resolve_user(spec: &str) -> Result<(u32, u32, Vec<u32>), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_user_in(spec, &passwd, &group)
}

/// [`resolve_user`] on given file contents.
pub fn resolve_user_in(
    spec: &str,
    passwd: &str,
    group: &str,
) -> Result<(u32, u32, Vec<u32>), String> {
    if spec.is_empty() {
        return Ok((0, 0, Vec::new()));
    }
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let pw: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let (uid, name, primary) = if let Ok(n) = u.parse::<u32>() {
        let e = pw.iter().find(|f| f[2] == u);
        (
            n,
            e.map(|f| f[0].to_string()),
            e.and_then(|f| f[3].parse().ok()).unwrap_or(0),
        )
    } else {
        let e = pw.iter().find(|f| f[0] == u).ok_or_else(|| {
            format!("unable to find user {u}: no matching entries in passwd file")
        })?;
        (
            e[2].parse()
                .map_err(|_| format!("bad uid for {u} in /etc/passwd"))?,
            Some(u.to_string()),
            e[3].parse()
                .map_err(|_| format!("bad gid for {u} in /etc/passwd"))?,
        )
    };
    let gr: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr.iter().find(|f| f[0] == g).ok_or_else(|| {
                format!("unable to find group {g}: no matching entries in group file")
            })?[2]
                .parse()
                .map_err(|_| format!("bad gid for group {g}"))?,
        },
    };
    // Supplementary groups: the groups listing the user by name (only when no group was given).
    let mut groups = vec![];
    if g.is_none() {
        if let Some(name) = name {
            for f in &gr {
                if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                    if let Ok(n) = f[2].parse::<u32>() {
                        if n != gid {
                            groups.push(n);
                        }
                    }
                }
            }
        }
    }
    groups.insert(0, gid);
    groups.dedup();
    Ok((uid, gid, groups))
}
