//! User-namespace ID maps.

use std::io;
use std::path::Path;

/// One extent of an ID map: `inside` … `inside+count-1` are `outside` … in the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    /// First ID inside the namespace.
    pub inside: u32,
    /// First ID in the parent namespace.
    pub outside: u32,
    /// Number of IDs.
    pub count: u32,
}

/// The uid and gid maps of a user namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMap {
    /// uid extents.
    pub uids: Vec<Extent>,
    /// gid extents.
    pub gids: Vec<Extent>,
}

/// Parses the text of `/proc/PID/uid_map`.
pub fn parse_map(text: &str) -> Vec<Extent> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<u32> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 3).then(|| Extent {
                inside: f[0],
                outside: f[1],
                count: f[2],
            })
        })
        .collect()
}

impl IdMap {
    /// The maps of the current process.
    pub fn current() -> io::Result<IdMap> {
        Ok(IdMap {
            uids: parse_map(&std::fs::read_to_string("/proc/self/uid_map")?),
            gids: parse_map(&std::fs::read_to_string("/proc/self/gid_map")?),
        })
    }

    /// Highest uid and gid the map can represent.
    pub fn max_ids(&self) -> (u64, u64) {
        let top = |v: &[Extent]| {
            v.iter()
                .map(|e| e.inside as u64 + e.count as u64)
                .max()
                .unwrap_or(1)
                .saturating_sub(1)
        };
        (top(&self.uids), top(&self.gids))
    }

    /// One line describing the map, e.g. `uid and gid map 0→1001 (1), 1→200000 (65536)`.
    pub fn describe(&self) -> String {
        let d = |v: &[Extent]| {
            v.iter()
                .map(|e| format!("{}→{} ({})", e.inside, e.outside, e.count))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.uids == self.gids {
            format!("uid and gid map {}", d(&self.uids))
        } else {
            format!("uid map {}; gid map {}", d(&self.uids), d(&self.gids))
        }
    }

    /// Whether the map covers the whole 32-bit ID space (an initial namespace).
    pub fn is_full(&self) -> bool {
        self.uids.iter().any(|e| e.count == u32::MAX)
    }
}

/// The identity map of a nested namespace: one extent per extent of the parent's map (one
/// spanning two parent extents is refused by the kernel).
pub fn nested_identity(parent: &[Extent]) -> String {
    parent
        .iter()
        .map(|e| format!("{} {} {}\n", e.inside, e.inside, e.count))
        .collect()
}

/// A subordinate ID range of `/etc/subuid` or `/etc/subgid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRange {
    /// First ID.
    pub start: u32,
    /// Number of IDs.
    pub count: u32,
}

/// The ranges of `user` (by name or uid) in a subid file.
pub fn sub_ranges(file: &Path, name: &str, id: u32) -> Vec<SubRange> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split(':').collect();
            if f.len() != 3 || (f[0] != name && f[0] != id.to_string()) {
                return None;
            }
            Some(SubRange {
                start: f[1].parse().ok()?,
                count: f[2].parse().ok()?,
            })
        })
        .filter(|r| r.count > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parse_describe_and_nest() {
        let m = IdMap {
            uids: parse_map("  0  1001  1\n  1  200000  65536\n"),
            gids: parse_map("0 1001 1\n1 200000 65536\n"),
        };
        assert_eq!(m.max_ids(), (65536, 65536));
        assert_eq!(m.describe(), "uid and gid map 0→1001 (1), 1→200000 (65536)");
        assert_eq!(nested_identity(&m.uids), "0 0 1\n1 1 65536\n");
        assert!(!m.is_full());
    }

    #[test]
    fn subid_lookup() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            t.path(),
            "alice:100000:65536\nbob:200000:65536\n1001:300000:10\n",
        )
        .unwrap();
        assert_eq!(
            sub_ranges(t.path(), "bob", 1002),
            vec![SubRange {
                start: 200000,
                count: 65536
            }]
        );
        assert_eq!(
            sub_ranges(t.path(), "carol", 1001),
            vec![SubRange {
                start: 300000,
                count: 10
            }]
        );
        assert!(sub_ranges(t.path(), "dave", 7).is_empty());
    }
}
