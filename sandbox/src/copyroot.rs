//! The copy snapshotter keeps the roots it assembled (in a directory the caller names), so a
//! step whose layers are the previous step's, that step's result and perhaps new layers on
//! top starts from that copy, applying only the new layers, instead of copying every layer
//! again.

use crate::run::RunError;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// (dev, ino, birth time) of a layer directory: survives the rename of a finished upperdir.
pub(crate) type LayerId = (u64, u64, i64, u32);

/// Identity of the layer directory `p`.
pub(crate) fn layer_id(p: &Path) -> Result<LayerId, RunError> {
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        p,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::BASIC_STATS | rustix::fs::StatxFlags::BTIME,
    )
    .map_err(|e| RunError::Setup {
        what: format!("layer {}", p.display()),
        source: e.into(),
    })?;
    Ok((
        rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
        st.stx_ino,
        st.stx_btime.tv_sec,
        st.stx_btime.tv_nsec,
    ))
}

/// How many of the top layers of `ids` must be applied to a root holding `held` (top first);
/// `None`: it must be rebuilt.
pub(crate) fn extra_layers(held: Option<&[LayerId]>, ids: &[LayerId]) -> Option<usize> {
    let held = held?;
    (ids.len() >= held.len() && ids[ids.len() - held.len()..] == *held)
        .then(|| ids.len() - held.len())
}

struct Cached {
    cache: PathBuf,
    dir: PathBuf,
    lowers: Vec<LayerId>,
}

/// Roots kept between steps, by cache directory.
static POOL: Mutex<Vec<Cached>> = Mutex::new(Vec::new());
/// Roots kept per cache directory at most (each is a whole image's files).
const KEEP: usize = 4;

/// A root directory for one step.
pub(crate) struct Lease {
    /// The root.
    pub dir: PathBuf,
    /// Its layers (top first), when known.
    pub lowers: Option<Vec<LayerId>>,
    cache: Option<PathBuf>,
}

/// A root for layers `ids`: from the pool under `cache` (the best kept one), else a new
/// directory there, else (no cache) `<scratch>/copyroot`.
pub(crate) fn take(
    cache: Option<&Path>,
    scratch: &Path,
    ids: &[LayerId],
) -> Result<Lease, RunError> {
    let mkdir = |d: &Path| {
        std::fs::create_dir_all(d).map_err(|e| RunError::Setup {
            what: format!("creating {}", d.display()),
            source: e,
        })
    };
    let Some(cache) = cache else {
        let dir = scratch.join("copyroot");
        mkdir(&dir)?;
        return Ok(Lease {
            dir,
            lowers: None,
            cache: None,
        });
    };
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let mine = |c: &Cached| c.cache == cache && c.dir.is_dir();
    let best = pool
        .iter()
        .position(|c| mine(c) && extra_layers(Some(&c.lowers), ids).is_some())
        .or_else(|| pool.iter().position(mine));
    if let Some(i) = best {
        let c = pool.remove(i);
        return Ok(Lease {
            dir: c.dir,
            lowers: Some(c.lowers),
            cache: Some(cache.to_path_buf()),
        });
    }
    drop(pool);
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = cache.join(format!(
        "root-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    mkdir(&dir)?;
    Ok(Lease {
        dir,
        lowers: None,
        cache: Some(cache.to_path_buf()),
    })
}

impl Lease {
    /// Keeps the root for the next step when it holds exactly `lowers`; else drops it.
    pub(crate) fn give_back(self, lowers: Option<Vec<LayerId>>) {
        match (self.cache, lowers) {
            (Some(cache), Some(lowers)) => {
                let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
                pool.push(Cached {
                    cache: cache.clone(),
                    dir: self.dir,
                    lowers,
                });
                let mine: Vec<usize> = pool
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.cache == cache)
                    .map(|(i, _)| i)
                    .collect();
                if mine.len() > KEEP {
                    let old = pool.remove(mine[0]);
                    drop(pool);
                    let _ = std::fs::remove_dir_all(old.dir);
                }
            }
            (Some(_), None) => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            // In the step's scratch space, removed with it.
            (None, _) => {}
        }
    }
}

/// Forgets (and removes) every root kept under `cache`; call when the build ends.
pub fn forget_copy_cache(cache: &Path) {
    let gone: Vec<Cached> = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let (gone, keep) = std::mem::take(&mut *pool)
            .into_iter()
            .partition(|c| c.cache == cache);
        *pool = keep;
        gone
    };
    for c in gone {
        let _ = std::fs::remove_dir_all(c.dir);
    }
    let _ = std::fs::remove_dir_all(cache);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_layers_on_top_of_what_a_root_holds() {
        let (a, b, c) = ((1, 1, 0, 0), (1, 2, 0, 0), (1, 3, 0, 0));
        assert_eq!(extra_layers(Some(&[b, a]), &[c, b, a]), Some(1));
        assert_eq!(extra_layers(Some(&[b, a]), &[b, a]), Some(0));
        assert_eq!(extra_layers(Some(&[b, a]), &[c, a]), None);
        assert_eq!(extra_layers(Some(&[c, b, a]), &[b, a]), None);
        assert_eq!(extra_layers(None, &[a]), None);
    }
}
