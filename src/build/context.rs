//! The build context's content, hashed once per build and source, off the async threads.

use super::*;

impl Builder {
    /// The content digest of what `pattern` selects in the named directory context `dir`
    /// (no ignore rules apply there), on a blocking thread.
    /// `exclude`: the COPY's `--exclude` matcher, whose files are left out.
    pub(super) async fn dir_hash(
        self: &Arc<Self>,
        dir: &Path,
        pattern: &str,
        exclude: Option<rbuild_dag::ignore::IgnoreMatcher>,
    ) -> Result<Digest> {
        let (me, dir, p) = (self.clone(), dir.to_path_buf(), pattern.to_string());
        let d = tokio::task::spawn_blocking(move || {
            me.ctx_hasher.hash(
                &dir,
                &rbuild_dag::ignore::IgnoreMatcher::default(),
                &p,
                exclude.as_ref(),
            )
        })
        .await??;
        Ok(d)
    }

    /// The content digest of the context source `pattern` (path or glob), less what the
    /// COPY's `--exclude` patterns `exclude` leave out, computed once per build on a
    /// blocking thread.
    pub(super) fn context_hash(self: &Arc<Self>, pattern: &str, exclude: &[String]) -> ContextHash {
        use futures_util::FutureExt;
        let memo = format!("{pattern}\0{}", exclude.join("\n"));
        let mut map = self.context_hashes.lock().unwrap();
        if let Some(h) = map.get(&memo) {
            return h.clone();
        }
        let me = self.clone();
        let p = pattern.to_string();
        let exclude = exclude.to_vec();
        let job = tokio::task::spawn_blocking(move || -> Result<Digest, String> {
            let ex = exclude_matcher(&exclude)?;
            // Reads only files whose stat changed; the digest leaves out owners, times and paths.
            me.ctx_hasher
                .hash(&me.opts.context, &me.ignore, &p, ex.as_ref())
                .map_err(|e| e.to_string())
        });
        let fut = async move { job.await.map_err(|e| e.to_string())? }
            .boxed()
            .shared();
        map.insert(memo, fut.clone());
        fut
    }
}

/// The matcher of a COPY's `--exclude` patterns (none without any).
pub(super) fn exclude_matcher(
    exclude: &[String],
) -> Result<Option<rbuild_dag::ignore::IgnoreMatcher>, String> {
    if exclude.is_empty() {
        return Ok(None);
    }
    rbuild_dag::ignore::IgnoreMatcher::new(&exclude.join("\n"))
        .map(Some)
        .map_err(|e| format!("--exclude: {e}"))
}
