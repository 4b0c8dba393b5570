//! Rank 0's checkpoint uploads: serialised on the training thread (a consistent snapshot),
//! streamed to the coordinator on the async runtime.

use std::time::Instant;

use anyhow::Context;

use super::client;
use super::ctx::Ctx;
use crate::train::checkpoint::{checkpoint_files, TrainerState};
use crate::train::{StageModel, Trainer};

/// A checkpoint upload running on the async runtime.
type Upload = tokio::task::JoinHandle<anyhow::Result<()>>;

/// Where rank 0's checkpoints go: the job and generation they belong to, and the one upload
/// in flight, if any.
pub(super) struct Uploads {
    job_id: String,
    generation: u64,
    /// The assignment's member secret: the coordinator takes uploads only from rank 0's.
    member_secret: String,
    in_flight: Option<Upload>,
}

impl Uploads {
    pub(super) fn new(job_id: &str, generation: u64, member_secret: &str) -> Self {
        Uploads {
            job_id: job_id.into(),
            generation,
            member_secret: member_secret.into(),
            in_flight: None,
        }
    }

    /// Serialises a checkpoint of `trainer` named `name` and streams it now.
    pub(super) fn now<M: StageModel>(
        &mut self,
        ctx: &Ctx,
        trainer: &Trainer<M>,
        state: &TrainerState,
        name: &str,
    ) -> anyhow::Result<()> {
        self.in_background(ctx, trainer, state, name)?;
        self.finish(ctx)
    }

    /// Serialises a checkpoint here (the snapshot), then streams it on the async runtime while
    /// training goes on, so no rank waits for the stream. One upload at a time, in order: a previous
    /// one is finished (and its error returned) first. A checkpoint still streaming when this
    /// worker dies is lost, as if the failure had come before it; the previous one is there.
    /// When another rank fails, the stream goes on and the coordinator waits for it before the
    /// next generation, which then resumes from it.
    pub(super) fn in_background<M: StageModel>(
        &mut self,
        ctx: &Ctx,
        trainer: &Trainer<M>,
        state: &TrainerState,
        name: &str,
    ) -> anyhow::Result<()> {
        self.finish(ctx)?;
        let task = self.put(ctx, trainer, state, name)?;
        self.in_flight = Some(ctx.rt.spawn(task));
        Ok(())
    }

    /// Waits for the upload in flight, if any.
    pub(super) fn finish(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        match self.in_flight.take() {
            Some(task) => ctx.rt.block_on(task).context("checkpoint upload task")?,
            None => Ok(()),
        }
    }

    /// The checkpoint's files, serialised now, and the future that streams them as `name`.
    fn put<M: StageModel>(
        &self,
        ctx: &Ctx,
        trainer: &Trainer<M>,
        state: &TrainerState,
        name: &str,
    ) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static>
    {
        let t0 = Instant::now();
        let files = checkpoint_files(trainer, state)?;
        let serialise_ms = t0.elapsed().as_millis() as u64;
        let mut c = ctx.client.clone();
        let (job_id, generation, name) = (self.job_id.clone(), self.generation, name.to_string());
        let secret = self.member_secret.clone();
        Ok(async move {
            let t1 = Instant::now();
            let to = client::Upload {
                job_id: &job_id,
                generation,
                member_secret: &secret,
                name: &name,
            };
            let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
            client::put_checkpoint(&mut c, &to, files).await?;
            tracing::info!(
                checkpoint = %name,
                mib = format!("{:.1}", bytes as f64 / (1 << 20) as f64),
                serialise_ms,
                upload_ms = t1.elapsed().as_millis() as u64,
                "checkpoint uploaded"
            );
            Ok(())
        })
    }
}
