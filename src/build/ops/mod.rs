//! The kinds of step, each behind one interface, as BuildKit's solver has them
//! (`solver/types.go`: an op gives its cache map, then executes): first the cache key from
//! the step's inputs, computed without reading any layer, so that a hit fetches nothing;
//! then, on a miss, the step run on the layers below into a layer of its own.
//!
//! What keying found (a download, a resolved network) goes to execution as the op's
//! [`Op::Inputs`], typed per op: no step can be run with another kind's inputs.

use super::*;

mod copy;
mod run;
mod workdir;

pub(super) use copy::CopyOp;
pub(super) use run::RunOp;
pub(super) use workdir::WorkdirOp;

/// A keyed step: its cache key, the key's labelled inputs (to say what changed on a miss)
/// and what running it needs.
pub(super) struct Planned<I> {
    /// The cache key.
    pub key: CacheKey,
    /// Its inputs, labelled.
    pub fields: Vec<(String, String)>,
    /// What execution needs of what keying found.
    pub inputs: I,
}

/// One kind of step.
pub(super) trait Op: Send + Sync + 'static {
    /// What keying finds that running needs.
    type Inputs: Send + 'static;

    /// The step's cache key on top of `fs`, from its inputs (context files by content, other
    /// stages by key), reading no layer.
    fn key(
        &self,
        b: &Arc<Builder>,
        fs: &ImageFs,
    ) -> impl std::future::Future<Output = Result<Planned<Self::Inputs>>> + Send;

    /// Runs the step on `fs` after a cache miss (fetching or unpacking what it stands on
    /// first) and gives the layer it made, if it changed anything.
    fn execute(
        &self,
        b: &Arc<Builder>,
        fs: &ImageFs,
        key: &CacheKey,
        planned: Planned<Self::Inputs>,
        ctx: &StepCtx,
    ) -> impl std::future::Future<Output = Result<Option<Layer>>> + Send;
}
