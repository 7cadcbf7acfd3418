//! The build context's content, hashed once per build and source, off the async threads.

use super::*;

impl Builder {
    /// The content digest of what `pattern` selects in the named directory context `dir`
    /// (no ignore rules apply there), on a blocking thread.
    pub(super) async fn dir_hash(self: &Arc<Self>, dir: &Path, pattern: &str) -> Result<Digest> {
        let (me, dir, p) = (self.clone(), dir.to_path_buf(), pattern.to_string());
        let d = tokio::task::spawn_blocking(move || {
            me.ctx_hasher
                .hash(&dir, &rbuild_dag::ignore::IgnoreMatcher::default(), &p)
        })
        .await??;
        Ok(d)
    }

    /// The content digest of the context source `pattern` (path or glob), computed once per
    /// build on a blocking thread.
    pub(super) fn context_hash(self: &Arc<Self>, pattern: &str) -> ContextHash {
        use futures_util::FutureExt;
        let mut map = self.context_hashes.lock().unwrap();
        if let Some(h) = map.get(pattern) {
            return h.clone();
        }
        let me = self.clone();
        let p = pattern.to_string();
        let job = tokio::task::spawn_blocking(move || -> Result<Digest, String> {
            // Reads only files whose stat changed; the digest leaves out owners, times and paths.
            me.ctx_hasher
                .hash(&me.opts.context, &me.ignore, &p)
                .map_err(|e| e.to_string())
        });
        let fut = async move { job.await.map_err(|e| e.to_string())? }
            .boxed()
            .shared();
        map.insert(pattern.to_string(), fut.clone());
        fut
    }
}
