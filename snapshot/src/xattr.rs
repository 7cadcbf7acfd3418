//! Reading the xattrs that belong in an image: the one reader for layer tars and tree copies.

use std::ffi::CString;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

/// Where xattrs are read from.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// An open file or directory.
    Fd(BorrowedFd<'a>),
    /// A path, not followed: for symlinks and devices, which are not opened.
    Link(&'a Path),
}

impl Source<'_> {
    fn list(self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            Source::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            Source::Link(p) => rustix::fs::llistxattr(p, buf),
        }
    }

    fn get(self, name: &CString, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            Source::Fd(fd) => rustix::fs::fgetxattr(fd, name.as_c_str(), buf),
            Source::Link(p) => rustix::fs::lgetxattr(p, name.as_c_str(), buf),
        }
    }
}

/// Whether an xattr is the overlay's (or fuse-overlayfs's) own bookkeeping, never image
/// content.
pub(crate) fn is_private(name: &[u8]) -> bool {
    [
        &b"user.overlay."[..],
        b"trusted.overlay.",
        b"user.fuseoverlayfs.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// The xattrs of `src` that belong in an image, sorted by name, in full: names and values
/// at the kernel's limits (64 KiB each), read in one call each.
pub(crate) fn image_xattrs(src: Source<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    // Most files have no xattrs, or a short list: one call into a small buffer says so,
    // with no allocation (this runs for every file of a layer).
    let mut small = [0u8; 512];
    let mut big = Vec::new();
    let list: &[u8] = match src.list(&mut small) {
        Ok(0) => return Ok(Vec::new()),
        Ok(n) => &small[..n],
        Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
        Err(rustix::io::Errno::RANGE) => {
            // XATTR_LIST_MAX: no name list is longer.
            big.resize(65536, 0);
            let n = src.list(&mut big)?;
            &big[..n]
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for raw in list.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        if is_private(raw) {
            continue;
        }
        let name = CString::new(raw).expect("xattr names have no NUL");
        // XATTR_SIZE_MAX: the kernel's limit for one value.
        let mut val = vec![0u8; 65536];
        match src.get(&name, &mut val) {
            Ok(len) => {
                val.truncate(len);
                out.push((raw.to_vec(), val));
            }
            // Removed in between.
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    Ok(out)
}
