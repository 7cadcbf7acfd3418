//! Base layers: blobs fetched once per build from their origin, checked, and unpacked into
//! the store (setuid files and devices held off disk).

use super::*;

impl Builder {
    /// Makes sure the store has blob `d` (fetching it from its origin once per build).
    pub(super) async fn ensure_blob(self: &Arc<Self>, d: &LayerDesc) -> Result<()> {
        if self.store.has_blob(&d.digest) {
            return Ok(());
        }
        let (job, _) = self.blob_job(d, None);
        job.await.map_err(|e| anyhow!(e))
    }

    /// The job that fetches blob `d` into the store, once per build: started here unless it
    /// runs already. `tap` gets a copy of the bytes (see [`crate::registry::BlobTap`]) only
    /// if this call starts a fetch from a registry, which the flag says.
    fn blob_job(
        self: &Arc<Self>,
        d: &LayerDesc,
        tap: Option<crate::registry::BlobTap>,
    ) -> (SharedJob<()>, bool) {
        use futures_util::FutureExt;
        let mut tapped = false;
        let job = {
            let mut jobs = self.blob_jobs.lock().unwrap();
            jobs.entry(d.digest.clone())
                .or_insert_with(|| {
                    let me = self.clone();
                    let d = d.clone();
                    tapped = tap.is_some()
                        && matches!(
                            me.origins.lock().unwrap().get(&d.digest),
                            Some(BlobOrigin::Registry(_))
                        );
                    async move {
                        let _permit = me
                            .fetch_permits
                            .acquire()
                            .await
                            .map_err(|e| e.to_string())?;
                        let origin = me.origins.lock().unwrap().get(&d.digest).cloned();
                        let res: Result<()> = match origin {
                            Some(BlobOrigin::Registry(r)) => {
                                let started = std::time::Instant::now();
                                let res = me
                                    .registry
                                    .fetch_blob(
                                        &r,
                                        &d.digest,
                                        d.size,
                                        crate::registry::MAX_UNSIZED_BLOB,
                                        &me.store,
                                        tap,
                                    )
                                    .await;
                                if res.is_ok() {
                                    // Pull progress on the display: one line per blob.
                                    me.progress.info(&format!(
                                        "fetched {} ({} bytes) from {r} in {:.1}s",
                                        d.digest,
                                        d.size,
                                        started.elapsed().as_secs_f64()
                                    ));
                                }
                                res.map(|_| ()).map_err(Into::into)
                            }
                            Some(BlobOrigin::Layout(dir)) => {
                                let store = me.store.clone();
                                let digest = d.digest.clone();
                                tokio::task::spawn_blocking(move || {
                                    crate::cachesync::fetch_from_layout(&dir, &digest, &store)
                                })
                                .await
                                .map_err(|e| anyhow!("{e}"))
                                .and_then(|r| r)
                            }
                            None => Err(anyhow!(
                                "blob {} is not in the store and no image or cache source has it",
                                d.digest
                            )),
                        };
                        res.map_err(|e| format!("{e:#}"))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        (job, tapped)
    }

    /// Unpacks layer `d` while its blob downloads (into the store all the same), so that a
    /// pull takes about as long as the slower of the two rather than their sum. `None` where
    /// that cannot be done (the blob is in the store or comes from elsewhere, or its fetch
    /// runs already) and where the streamed unpack failed though the fetch worked: the
    /// caller then unpacks from the stored blob, which reports that failure if it is real.
    async fn stream_unpack(
        self: &Arc<Self>,
        d: &LayerDesc,
        lowers: Option<Vec<PathBuf>>,
    ) -> Option<Result<(Unpacked, Vec<String>), String>> {
        if self.store.has_blob(&d.digest) {
            return None;
        }
        // A few of the HTTP client's chunks (up to about a MiB each): the download waits
        // for the unpack beyond that. 256 made the debian pull peak at 58 MiB, 4 at 26 MiB,
        // in the same time.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let (job, tapped) = self.blob_job(d, Some(tx));
        if !tapped {
            return None;
        }
        // The unpack (a thread and its buffers) starts with the first bytes, not while the
        // fetch waits for its turn: a base of 25 layers held 1 MiB per waiting layer.
        let mut fetched = None;
        let first = tokio::select! {
            m = rx.recv() => m,
            r = job.clone() => {
                fetched = Some(r);
                rx.recv().await
            }
        };
        let fetch = async {
            match fetched {
                Some(r) => r,
                None => job.await,
            }
        };
        let Some(Ok(first)) = first else {
            // Broken off before any byte: unpacked from the stored blob, if it came.
            return fetch.await.err().map(Err);
        };
        let store = self.store.clone();
        let desc = d.clone();
        let unpack = tokio::task::spawn_blocking(move || {
            unpack_from(&store, &desc, lowers.as_deref(), TapReader::new(rx, first))
        });
        let (fetched, unpacked) = tokio::join!(fetch, unpack);
        if let Err(e) = fetched {
            return Some(Err(e));
        }
        match unpacked {
            Ok(Ok(u)) => Some(Ok(u)),
            _ => None,
        }
    }

    /// Makes sure the store has the blobs of `layers`, fetching missing ones concurrently.
    pub(super) async fn ensure_blobs(self: &Arc<Self>, layers: &[LayerDesc]) -> Result<()> {
        futures_util::future::try_join_all(layers.iter().map(|l| self.ensure_blob(l))).await?;
        Ok(())
    }

    /// Whether blob `digest` in the store no longer matches its digest; such a blob is
    /// removed (and forgotten by this build's fetches, so that [`Builder::ensure_blob`]
    /// fetches it again) with a warning.
    pub(super) async fn drop_if_corrupt(self: &Arc<Self>, digest: &Digest) -> bool {
        let store = self.store.clone();
        let d = digest.clone();
        let intact = tokio::task::spawn_blocking(move || store.blob_is_intact(&d))
            .await
            .unwrap_or(Ok(true))
            .unwrap_or(true);
        if intact {
            return false;
        }
        let _ = fs::remove_file(self.store.blob_path(digest));
        self.blob_jobs.lock().unwrap().remove(digest);
        self.progress.warn(&format!(
            "blob {digest} in the store no longer matches its digest (corrupted on disk): removed, fetching it again"
        ));
        true
    }

    /// Makes sure layer `d` is unpacked in the store (once per build) and says where. With
    /// `lowers` (the directories of the layers below, newest first), a layer that leaves out
    /// parent directories is unpacked over them; without, it is only found to need them.
    pub(super) async fn ensure_unpacked(
        self: &Arc<Self>,
        d: &LayerDesc,
        lowers: Option<Vec<PathBuf>>,
    ) -> Result<Unpacked> {
        use futures_util::FutureExt;
        if self.store.has_layer(&d.diff_id) {
            return Ok(Unpacked::Dir(self.store.layer_dir(&d.diff_id)));
        }
        let stack = lowers.as_ref().map(|l| stack_key(l, &d.diff_id));
        if let Some(stack) = &stack {
            let dir = self.store.layer_over_dir(&d.diff_id, stack);
            if dir.is_dir() {
                return Ok(Unpacked::Dir(dir));
            }
        } else if self.store.layer_over_root(&d.diff_id).is_dir() {
            return Ok(Unpacked::NeedsLowers);
        }
        let job = {
            let mut jobs = self.unpack_jobs.lock().unwrap();
            jobs.entry(stack.clone().unwrap_or_else(|| d.diff_id.clone()))
                .or_insert_with(|| {
                    let me = self.clone();
                    let d = d.clone();
                    async move {
                        let unpack = |me: Arc<Self>, d: LayerDesc, lowers: Option<Vec<PathBuf>>| async move {
                            let store = me.store.clone();
                            tokio::task::spawn_blocking(move || {
                                unpack_into_store(&store, &d, lowers.as_deref())
                            })
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| format!("{e:#}"))
                        };
                        let mut res = match me.stream_unpack(&d, lowers.clone()).await {
                            Some(res) => res,
                            None => {
                                me.ensure_blob(&d).await.map_err(|e| format!("{e:#}"))?;
                                unpack(me.clone(), d.clone(), lowers.clone()).await
                            }
                        };
                        if res.is_err() && me.drop_if_corrupt(&d.digest).await {
                            // Fetched again, once: a blob that rotted on disk is not used
                            // (and failed on) for ever.
                            me.ensure_blob(&d).await.map_err(|e| format!("{e:#}"))?;
                            res = unpack(me.clone(), d.clone(), lowers).await;
                        }
                        let (unpacked, skipped) = res?;
                        if !skipped.is_empty() {
                            me.progress.warn(&format!(
                                "layer {}: trusted.* xattrs left out (only the host's root may set them, and the kernel acts on them): {}",
                                d.digest,
                                skipped.join(", ")
                            ));
                        }
                        Ok(unpacked)
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        job.await.map_err(|e| anyhow!(e))
    }
}

/// Where a layer is unpacked in the store.
#[derive(Debug, Clone)]
pub(super) enum Unpacked {
    /// In this directory.
    Dir(PathBuf),
    /// Its tar leaves out parent directories, which the layers below it decide: it is
    /// unpacked once per stack of them ([`Store::layer_over_dir`]).
    NeedsLowers,
}

/// Names the stack of layer directories `lowers` (newest first) under layer `diff_id`. Each
/// store directory's name says what it holds (a diffID, a cache key, or a stack like this).
pub(super) fn stack_key(lowers: &[PathBuf], diff_id: &Digest) -> Digest {
    let mut s = String::from("rbuild layer over a stack, v1\n");
    for l in lowers.iter().rev() {
        s.push_str(&l.file_name().unwrap_or_default().to_string_lossy());
        s.push('\n');
    }
    s.push_str(diff_id.as_str());
    Digest::of(s.as_bytes())
}

/// Unpacks a layer into the store: without `lowers`, where it depends on nothing below it
/// (else it is only marked as needing them); with them, over them. Gives where it is and
/// the `trusted.*` xattrs left out.
pub(super) fn unpack_into_store(
    store: &Store,
    l: &LayerDesc,
    lowers: Option<&[PathBuf]>,
) -> Result<(Unpacked, Vec<String>)> {
    if store.has_layer(&l.diff_id) {
        return Ok((Unpacked::Dir(store.layer_dir(&l.diff_id)), Vec::new()));
    }
    let file = store.open_blob(&l.digest)?;
    unpack_from(store, l, lowers, file)
}

/// [`unpack_into_store`] from the blob's bytes as `blob` gives them. The content is checked
/// against the diffID before the directory is named by it; the blob's own digest is its
/// fetcher's to check.
pub(super) fn unpack_from(
    store: &Store,
    l: &LayerDesc,
    lowers: Option<&[PathBuf]>,
    blob: impl std::io::Read + Send + 'static,
) -> Result<(Unpacked, Vec<String>)> {
    if store.has_layer(&l.diff_id) {
        return Ok((Unpacked::Dir(store.layer_dir(&l.diff_id)), Vec::new()));
    }
    // Decompressing on a thread of its own, while this one hashes and writes the files.
    let reader =
        rbuild_snapshot::read_ahead(rbuild_snapshot::decompress(std::io::BufReader::new(blob))?)?;
    let tmp = store.temp_dir("unpack")?;
    let mut hashing = rbuild_cache::VerifyingReader::hashing(reader);
    let opts = rbuild_snapshot::UnpackOptions {
        lowers: lowers.map(<[PathBuf]>::to_vec).unwrap_or_default(),
        ..Default::default()
    };
    let res = rbuild_snapshot::unpack_layer(&mut hashing, &tmp, &opts);
    let stats = match res {
        Ok(s) => s,
        Err(e) => {
            let _ = rbuild_cache::remove_tree(&tmp);
            bail!("unpacking layer {}: {e}", l.digest);
        }
    };
    // Drain what the tar reader left (end-of-archive padding) so the diffID covers it all.
    if let Err(e) = std::io::copy(&mut hashing, &mut std::io::sink()) {
        let _ = rbuild_cache::remove_tree(&tmp);
        bail!("unpacking layer {}: {e}", l.digest);
    }
    let diff_id = hashing.finish();
    if diff_id != l.diff_id {
        let _ = rbuild_cache::remove_tree(&tmp);
        bail!(
            "layer {}: uncompressed content is {diff_id}, but the image config says {}",
            l.digest,
            l.diff_id
        );
    }
    if lowers.is_none() && stats.implicit_dirs > 0 {
        rbuild_cache::remove_tree(&tmp)?;
        store.mark_layer_over(&l.diff_id)?;
        return Ok((Unpacked::NeedsLowers, stats.skipped_xattrs));
    }
    // Beside the directory; committing it moves the record along.
    stats.held.save(&tmp)?;
    let dir = match lowers {
        None => store.commit_layer_dir(&tmp, &l.diff_id)?,
        Some(lowers) => {
            store.commit_layer_over(&tmp, &l.diff_id, &stack_key(lowers, &l.diff_id))?
        }
    };
    Ok((Unpacked::Dir(dir), stats.skipped_xattrs))
}

/// The copy of a blob a [`crate::registry::BlobTap`] sends, as a [`std::io::Read`] for a
/// blocking thread.
struct TapReader {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    cur: bytes::Bytes,
    done: bool,
}

impl TapReader {
    /// The copy whose first chunk, `first`, came already (an empty one ends it).
    fn new(
        rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
        first: bytes::Bytes,
    ) -> Self {
        TapReader {
            rx,
            done: first.is_empty(),
            cur: first,
        }
    }
}

impl std::io::Read for TapReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        use bytes::Buf;
        while self.cur.is_empty() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(b)) if b.is_empty() => self.done = true,
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the download stopped before the blob's end",
                    ))
                }
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}
