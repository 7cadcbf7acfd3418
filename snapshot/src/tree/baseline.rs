//! What a step changed without overlayfs: a baseline of every entry's `statx` before the
//! step, and a second walk after it that writes the changes as an overlay-form upperdir.

use super::*;

/// One entry of a [`Baseline`].
#[derive(Debug)]
struct Node {
    meta: Meta,
    children: HashMap<OsString, Node>,
}

/// The `statx` of every entry of a root filesystem, taken before a step runs.
#[derive(Debug)]
pub struct Baseline {
    root: Node,
    dev: (u32, u32),
    entries: u64,
}

impl Baseline {
    /// Records every entry of `root` (not crossing into other filesystems, leaving out `skip`).
    pub fn capture(root: &Path, skip: &Skip) -> Result<Baseline, TreeError> {
        let fd = open_root(root)?;
        let st = rustix::fs::statx(&fd, c"", AtFlags::EMPTY_PATH, STATX_MASK).map_err(rx(root))?;
        let dev = (st.stx_dev_major, st.stx_dev_minor);
        let mut entries = 0;
        let mut node = Node {
            meta: Meta::of(&st),
            children: HashMap::new(),
        };
        capture_dir(&fd, root, Path::new(""), skip, dev, &mut node, &mut entries)?;
        Ok(Baseline {
            root: node,
            dev,
            entries,
        })
    }

    /// Entries recorded.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// Whether nothing was recorded (an empty root).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Writes what changed in `root` since the capture into `upper` (an existing, empty
    /// directory) in overlay form.
    pub fn diff_into(
        &self,
        root: &Path,
        upper: &Path,
        skip: &Skip,
    ) -> Result<TreeDiffStats, TreeError> {
        let fd = open_root(root)?;
        let mut w = DiffWalk {
            skip,
            dev: self.dev,
            root,
            links: HashMap::new(),
            tree: ChangeNode::default(),
        };
        w.walk(&fd, Path::new(""), &self.root)?;
        // An inode that gained a path was copied up by overlayfs under each of its names:
        // write every name of every emitted multiply-linked inode.
        let DiffWalk {
            links, mut tree, ..
        } = w;
        for paths in links.values() {
            if paths.iter().any(|(_, emitted)| *emitted) {
                for (p, emitted) in paths {
                    if !emitted {
                        tree.insert(p, Op::Entry);
                    }
                }
            }
        }
        let upper_fd = open_root(upper)?;
        let mut wr = Writer {
            root,
            upper,
            upper_root: upper_fd.try_clone().map_err(ioe(upper))?,
            written: HashMap::new(),
            stats: TreeDiffStats::default(),
        };
        wr.write(&fd, &upper_fd, Path::new(""), &tree)?;
        Ok(wr.stats)
    }
}

fn capture_dir(
    dir: &OwnedFd,
    root: &Path,
    rel: &Path,
    skip: &Skip,
    dev: (u32, u32),
    node: &mut Node,
    n: &mut u64,
) -> Result<(), TreeError> {
    for name in names(dir).map_err(rx(root.join(rel)))? {
        let child = rel.join(os(&name));
        if skip.skipped(&child) {
            continue;
        }
        let st = match stx(dir, &name) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(rx(root.join(&child))(e)),
        };
        let mut meta = Meta::of(&st);
        let mut c = Node {
            meta,
            children: HashMap::new(),
        };
        if meta.is_dir() {
            if (st.stx_dev_major, st.stx_dev_minor) != dev {
                continue; // a mount point
            }
            let sub = open_dir(dir, &name).map_err(rx(root.join(&child)))?;
            capture_dir(&sub, root, &child, skip, dev, &mut c, n)?;
        } else if meta.is_reg() && meta.nlink > 1 {
            if let Ok(f) = rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                meta.xhash = xattr_hash(&f);
                c.meta = meta;
            }
        }
        *n += 1;
        node.children.insert(os(&name).to_os_string(), c);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Copy this non-directory.
    Entry,
    /// Copy this directory (its metadata; its children are listed themselves).
    Dir { opaque: bool },
    /// Write a whiteout.
    Whiteout,
}

/// The changes, as a tree; a node without an op is a parent directory copied only to hold
/// its children.
#[derive(Debug, Default)]
struct ChangeNode {
    op: Option<Op>,
    children: BTreeMap<OsString, ChangeNode>,
}

impl ChangeNode {
    fn insert(&mut self, rel: &Path, op: Op) {
        let mut n = self;
        for c in rel.iter() {
            n = n.children.entry(c.to_os_string()).or_default();
        }
        n.op = Some(op);
    }
}

struct DiffWalk<'a> {
    skip: &'a Skip,
    dev: (u32, u32),
    root: &'a Path,
    /// Multiply-linked non-directories: (dev, ino) → [(path, emitted)].
    links: HashMap<(u32, u32, u64), Vec<(PathBuf, bool)>>,
    tree: ChangeNode,
}

/// Whether a non-directory changed since the baseline.
pub(super) fn changed(b: &Meta, now: &Meta, xhash_now: impl FnOnce() -> u64) -> bool {
    if b.ino != now.ino
        || b.size != now.size
        || b.mtime != now.mtime
        || b.perm != now.perm
        || b.uid != now.uid
        || b.gid != now.gid
        || b.rdev != now.rdev
    {
        return true;
    }
    if b.ctime == now.ctime {
        return false;
    }
    // Only the link count moved (a name of a multiply-linked file was removed, or one was
    // added — then the new name is emitted and pulls this one in): overlayfs copies up nothing
    // for a removal, so neither do we, unless the xattrs changed too.
    !(b.nlink != now.nlink && b.is_reg() && b.xhash == xhash_now())
}

impl DiffWalk<'_> {
    fn note_link(&mut self, st: &Statx, rel: &Path, emitted: bool) {
        if st.stx_nlink > 1 && ftype(st) != FileType::Directory {
            self.links
                .entry((st.stx_dev_major, st.stx_dev_minor, st.stx_ino))
                .or_default()
                .push((rel.to_path_buf(), emitted));
        }
    }

    /// Walks directory `dir` (at `rel`) against its baseline `base`; records changes in
    /// `self.tree`. Returns whether anything below changed.
    fn walk(&mut self, dir: &OwnedFd, rel: &Path, base: &Node) -> Result<bool, TreeError> {
        let mut any = false;
        let mut seen: HashSet<OsString> = HashSet::new();
        for name in names(dir).map_err(rx(self.root.join(rel)))? {
            let child = rel.join(os(&name));
            seen.insert(os(&name).to_os_string());
            if self.skip.skipped(&child) {
                continue;
            }
            let st = match stx(dir, &name) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(rx(self.root.join(&child))(e)),
            };
            let now = Meta::of(&st);
            if now.is_dir() && (st.stx_dev_major, st.stx_dev_minor) != self.dev {
                continue; // a mount point
            }
            match base.children.get(os(&name)) {
                None => {
                    self.add_subtree(dir, &name, &child, &st, false)?;
                    any = true;
                }
                Some(b) if b.meta.kind != now.kind => {
                    // A directory made where a non-directory was is opaque, as in overlayfs.
                    self.add_subtree(dir, &name, &child, &st, now.is_dir())?;
                    any = true;
                }
                Some(b) if now.is_dir() => {
                    let same = b.meta.ino == now.ino
                        && (b.meta.btime.is_none()
                            || now.btime.is_none()
                            || b.meta.btime == now.btime);
                    if !same {
                        // Removed and made again: overlayfs makes it opaque.
                        self.add_subtree(dir, &name, &child, &st, true)?;
                        any = true;
                        continue;
                    }
                    let self_changed = b.meta.ctime != now.ctime
                        || b.meta.mtime != now.mtime
                        || b.meta.perm != now.perm
                        || b.meta.uid != now.uid
                        || b.meta.gid != now.gid;
                    let sub = open_dir(dir, &name).map_err(rx(self.root.join(&child)))?;
                    let below = self.walk(&sub, &child, b)?;
                    if self_changed || below {
                        self.tree.insert(&child, Op::Dir { opaque: false });
                        any = true;
                    }
                }
                Some(b) => {
                    let is_changed = changed(&b.meta, &now, || {
                        rustix::fs::openat(
                            dir,
                            &name,
                            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map(|f| xattr_hash(&f))
                        .unwrap_or(0)
                    });
                    self.note_link(&st, &child, is_changed);
                    if is_changed {
                        self.tree.insert(&child, Op::Entry);
                        any = true;
                    }
                }
            }
        }
        for name in base.children.keys() {
            if !seen.contains(name) {
                let child = rel.join(name);
                if !self.skip.skipped(&child) {
                    self.tree.insert(&child, Op::Whiteout);
                    any = true;
                }
            }
        }
        Ok(any)
    }

    /// Records `name` (and, for a directory, everything below it) as new.
    fn add_subtree(
        &mut self,
        dir: &OwnedFd,
        name: &CStr,
        rel: &Path,
        st: &Statx,
        opaque: bool,
    ) -> Result<(), TreeError> {
        if ftype(st) != FileType::Directory {
            self.note_link(st, rel, true);
            self.tree.insert(rel, Op::Entry);
            return Ok(());
        }
        self.tree.insert(rel, Op::Dir { opaque });
        let sub = open_dir(dir, name).map_err(rx(self.root.join(rel)))?;
        for n in names(&sub).map_err(rx(self.root.join(rel)))? {
            let child = rel.join(os(&n));
            if self.skip.skipped(&child) {
                continue;
            }
            let cst = match stx(&sub, &n) {
                Ok(s) => s,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(rx(self.root.join(&child))(e)),
            };
            if ftype(&cst) == FileType::Directory
                && (cst.stx_dev_major, cst.stx_dev_minor) != self.dev
            {
                continue;
            }
            self.add_subtree(&sub, &n, &child, &cst, false)?;
        }
        Ok(())
    }
}

struct Writer<'a> {
    root: &'a Path,
    upper: &'a Path,
    upper_root: OwnedFd,
    /// (dev, ino) in the root → first path written in the upperdir (hardlinks).
    written: HashMap<(u32, u32, u64), PathBuf>,
    stats: TreeDiffStats,
}

impl Writer<'_> {
    fn write(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        rel: &Path,
        node: &ChangeNode,
    ) -> Result<(), TreeError> {
        for (name, child) in &node.children {
            let crel = rel.join(name);
            let cname = std::ffi::CString::new(name.as_bytes()).expect("file names have no NUL");
            let upath = || self.upper.join(&crel);
            match child.op {
                Some(Op::Whiteout) => {
                    make_whiteout_at(dst, cname.as_c_str()).map_err(ioe(upath()))?;
                    self.stats.whiteouts += 1;
                }
                Some(Op::Entry) => {
                    let st = match stx(src, &cname) {
                        Ok(st) => st,
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(e) => return Err(rx(self.root.join(&crel))(e)),
                    };
                    let key = (st.stx_dev_major, st.stx_dev_minor, st.stx_ino);
                    if st.stx_nlink > 1 && ftype(&st) != FileType::Directory {
                        if let Some(first) = self.written.get(&key) {
                            rustix::fs::linkat(
                                &self.upper_root,
                                first.as_path(),
                                dst,
                                &cname,
                                AtFlags::empty(),
                            )
                            .map_err(rx(upath()))?;
                            self.stats.entries += 1;
                            continue;
                        }
                    }
                    if let Copied::Done(n) =
                        copy_entry(src, &cname, &st, dst, &cname).map_err(ioe(upath()))?
                    {
                        self.stats.entries += 1;
                        self.stats.bytes += n;
                        if st.stx_nlink > 1 {
                            self.written.insert(key, crel.clone());
                        }
                    }
                }
                Some(Op::Dir { .. }) | None => {
                    let st = stx(src, &cname).map_err(rx(self.root.join(&crel)))?;
                    if ftype(&st) != FileType::Directory {
                        return Err(ioe(self.root.join(&crel))(io::Error::other(
                            "changed from a directory while the layer was written",
                        )));
                    }
                    let s = open_dir(src, &cname).map_err(rx(self.root.join(&crel)))?;
                    match rustix::fs::mkdirat(dst, &cname, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(rx(upath())(e)),
                    }
                    let d = open_dir(dst, &cname).map_err(rx(upath()))?;
                    copy_dir_meta(&s, &st, &d, false).map_err(ioe(upath()))?;
                    if child.op == Some(Op::Dir { opaque: true }) {
                        set_opaque(&d).map_err(ioe(upath()))?;
                    }
                    self.stats.entries += 1;
                    self.write(&s, &d, &crel, child)?;
                    set_times_fd(&d, &st).map_err(ioe(upath()))?;
                }
            }
        }
        Ok(())
    }
}
