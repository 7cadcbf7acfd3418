//! WORKDIR: the directory made where the image lacks it, owned by the stage's user.

use super::*;

/// A WORKDIR step as an [`Op`].
pub(in crate::build) struct WorkdirOp(pub(in crate::build) WorkdirStep);

impl Op for WorkdirOp {
    type Inputs = ();

    async fn key(&self, _: &Arc<Builder>, fs: &ImageFs) -> Result<Planned<()>> {
        let WorkdirStep { path, .. } = &self.0;
        // Whether the directory exists and who owns it follow from the parent state,
        // so the key needs no look at the layers.
        let mut kb = CacheKeyBuilder::new("workdir");
        kb.str("parent", fs.key.as_str())
            .str("path", path)
            .str("user", &fs.state.user);
        Ok(Planned {
            key: kb.finish(),
            fields: kb.fields().to_vec(),
            inputs: (),
        })
    }

    async fn execute(
        &self,
        b: &Arc<Builder>,
        fs: &ImageFs,
        key: &CacheKey,
        planned: Planned<()>,
        ctx: &StepCtx,
    ) -> Result<Option<Layer>> {
        let WorkdirStep { path, .. } = &self.0;
        let Planned { fields, .. } = planned;
        let stack = b.materialize_dep(fs).await?;
        let pstep = b.progress.start(&ctx.name);
        let res = async {
            if stack
                .resolve(path, true)
                .map(|(_, _, m)| m.is_dir())
                .unwrap_or(false)
            {
                b.record_no_layer(key)?;
                return Ok(None);
            }
            b.explain_miss(&ctx.id, &fields, &pstep);
            let owner = if fs.state.user.is_empty() {
                (0, 0)
            } else {
                stack.resolve_user(&fs.state.user).unwrap_or((0, 0))
            };
            let staging = b.store.temp_dir("workdir")?;
            crate::copy::ensure_dir_owned(&staging, &stack, &clean_components(path), owner)?;
            b.export_layer(staging, key, &pstep, ctx.stage)
        }
        .await;
        finish_pstep(&pstep, res)
    }
}
