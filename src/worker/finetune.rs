//! A fine-tuning stage on one rank: the task model starts from the previous stage's (or an
//! imported) encoder, trains data-parallel with the same exact normalisation as pre-training
//! (loss sums over global counts), and evaluates the dev set across ranks at the end of every
//! epoch (each rank scores its share; metric counts are all-reduced, never averaged).
//! Checkpoints are taken at epoch ends; rank 0 keeps the best one by the configured metric.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;

use super::client;
use super::recent::Recent;
use super::train::{connect_collective, report_done, set_phase, Ctx};

use crate::comm::Collective;
use crate::config::{JobConfig, StageKind};
use crate::data::batch::{FinetuneBatch, TaskLabels, IGNORE};
use crate::data::finetune::{
    collate_classification, collate_qa, collate_tokens, ClassificationFeature, ClassificationSet,
    LabelMap, Padding, QaExample, QaFeature, QaOptions, QaSet, TokenFeature, TokenSet,
};
use crate::data::tokenizer::Tokenizer;
use crate::metrics::{postprocess_qa, MetricCounts, MetricKind, QaPostprocess};
use crate::model::{hf, BertConfig, TaskHead, TaskModel};
use crate::proto;
use crate::train::checkpoint::{
    checkpoint_name, restore_store, store_files, DataCursor, LedgerRange, TrainerState,
};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::Schedule;
use crate::train::{UpdatePlace, Updater};
use crate::util;

/// A stage's featurised data.
enum TaskData {
    Classes {
        train: Vec<ClassificationFeature>,
        dev: Vec<ClassificationFeature>,
        labels: LabelMap,
    },
    Tokens {
        train: Vec<TokenFeature>,
        dev: Vec<TokenFeature>,
        labels: LabelMap,
    },
    Qa {
        train: Vec<QaFeature>,
        dev: Vec<QaExample>,
        opts: QaOptions,
    },
}

impl TaskData {
    fn load(
        kind: StageKind,
        files: &[proto::DataFile],
        fetch: impl Fn(&str) -> anyhow::Result<Vec<u8>>,
        tok: &Tokenizer,
        cfg: &crate::config::StageConfig,
        dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let path = |role: &str| -> anyhow::Result<std::path::PathBuf> {
            let f = files
                .iter()
                .find(|f| f.role == role)
                .with_context(|| format!("the assignment carries no {role} file"))?;
            let data = fetch(role)?;
            anyhow::ensure!(
                crate::train::checkpoint::sha256_hex(&data) == f.sha256,
                "the {role} file {} differs from the one the coordinator announced",
                f.name
            );
            let p = dir.join(format!("{role}-{}", f.name));
            std::fs::write(&p, &data)?;
            Ok(p)
        };
        let (train, dev) = (path("train")?, path("dev")?);
        Ok(match kind {
            StageKind::SequenceClassification | StageKind::PairClassification => {
                let t = ClassificationSet::read(&train)?;
                let labels = t.label_map()?;
                let d = ClassificationSet::read(&dev)?;
                TaskData::Classes {
                    train: t.featurize(tok, Some(&labels), cfg.max_seq_length)?,
                    dev: d.featurize(tok, Some(&labels), cfg.max_seq_length)?,
                    labels,
                }
            }
            StageKind::TokenClassification => {
                let t = TokenSet::read(&train)?;
                let labels = t.label_map()?;
                let d = TokenSet::read(&dev)?;
                TaskData::Tokens {
                    train: t.featurize(tok, Some(&labels), cfg.max_seq_length)?,
                    dev: d.featurize(tok, Some(&labels), cfg.max_seq_length)?,
                    labels,
                }
            }
            StageKind::QuestionAnswering => {
                let opts = QaOptions {
                    max_seq_length: cfg.max_seq_length,
                    doc_stride: cfg.doc_stride,
                    max_query_length: cfg.max_query_length,
                };
                TaskData::Qa {
                    train: QaSet::read(&train)?.featurize(tok, &opts)?,
                    dev: QaSet::read(&dev)?.examples,
                    opts,
                }
            }
            StageKind::Pretrain => anyhow::bail!("not a fine-tuning stage"),
        })
    }

    fn head(&self) -> TaskHead {
        match self {
            TaskData::Classes { labels, .. } => TaskHead::SequenceClassification {
                num_labels: labels.len(),
            },
            TaskData::Tokens { labels, .. } => TaskHead::TokenClassification {
                num_labels: labels.len(),
            },
            TaskData::Qa { .. } => TaskHead::QuestionAnswering,
        }
    }

    fn label_names(&self) -> Vec<String> {
        match self {
            TaskData::Classes { labels, .. } | TaskData::Tokens { labels, .. } => {
                labels.names().to_vec()
            }
            TaskData::Qa { .. } => vec![],
        }
    }

    fn n_train(&self) -> usize {
        match self {
            TaskData::Classes { train, .. } => train.len(),
            TaskData::Tokens { train, .. } => train.len(),
            TaskData::Qa { train, .. } => train.len(),
        }
    }

    fn batch(&self, idx: &[usize], pad: u32) -> anyhow::Result<FinetuneBatch> {
        Ok(match self {
            TaskData::Classes { train, .. } => {
                collate_classification(&pick(train, idx), pad, Padding::Longest)?
            }
            TaskData::Tokens { train, .. } => {
                collate_tokens(&pick(train, idx), pad, Padding::Longest)?
            }
            TaskData::Qa { train, .. } => collate_qa(&pick(train, idx), pad, Padding::Longest)?,
        })
    }

    fn metric_kind(&self) -> MetricKind {
        match self {
            TaskData::Classes { labels, .. } => MetricKind::Classification {
                num_labels: labels.len(),
            },
            TaskData::Tokens { .. } => MetricKind::Entities,
            TaskData::Qa { .. } => MetricKind::Squad,
        }
    }

    /// This rank's share of the dev metrics (examples `rank`, `rank + world`, …).
    fn evaluate(
        &self,
        model: &TaskModel,
        tok: &Tokenizer,
        rank: usize,
        world: usize,
    ) -> anyhow::Result<MetricCounts> {
        let mut counts = MetricCounts::new(self.metric_kind());
        let pad = tok.pad_id();
        let mine = |n: usize| (rank..n).step_by(world).collect::<Vec<_>>();
        match (self, &mut counts) {
            (TaskData::Classes { dev, .. }, MetricCounts::Classification(cm)) => {
                for idx in mine(dev.len()).chunks(64) {
                    let b = collate_classification(&pick(dev, idx), pad, Padding::Longest)?;
                    let pred = model.logits(&b)?.argmax(1)?.to_vec1::<u32>()?;
                    let TaskLabels::Classes(gold) = &b.labels else {
                        anyhow::bail!("dev set without labels")
                    };
                    cm.add_all(gold, &pred)?;
                }
            }
            (TaskData::Tokens { dev, labels, .. }, MetricCounts::Entities(ec)) => {
                for idx in mine(dev.len()).chunks(64) {
                    let b = collate_tokens(&pick(dev, idx), pad, Padding::Longest)?;
                    let pred = model
                        .logits(&b)?
                        .argmax(2)?
                        .flatten_all()?
                        .to_vec1::<u32>()?;
                    let TaskLabels::Tokens(gold) = &b.labels else {
                        anyhow::bail!("dev set without labels")
                    };
                    for r in 0..b.batch {
                        let span = r * b.seq..(r + 1) * b.seq;
                        ec.add_positions(&gold[span.clone()], &pred[span], labels)?;
                    }
                }
            }
            (TaskData::Qa { dev, opts, .. }, MetricCounts::Squad(sc)) => {
                let examples: Vec<QaExample> = mine(dev.len())
                    .into_iter()
                    .map(|i| dev[i].clone())
                    .collect();
                let features = crate::data::finetune::featurize_qa(&examples, tok, opts)?;
                let (mut starts, mut ends) = (vec![], vec![]);
                for chunk in features.chunks(32) {
                    let b = collate_qa(chunk, pad, Padding::Longest)?;
                    let logits = model.logits(&b)?; // [batch, seq, 2]
                    let s = logits.narrow(2, 0, 1)?.squeeze(2)?.to_vec2::<f32>()?;
                    let e = logits.narrow(2, 1, 1)?.squeeze(2)?.to_vec2::<f32>()?;
                    starts.extend(s);
                    ends.extend(e);
                }
                let v2 = dev.iter().any(|e| e.is_impossible);
                let post = QaPostprocess {
                    version_2_with_negative: v2,
                    ..Default::default()
                };
                let preds = postprocess_qa(&examples, &features, &starts, &ends, &post)?;
                sc.add_predictions(&examples, &preds)?;
            }
            _ => unreachable!("metric kind follows the data"),
        }
        Ok(counts)
    }
}

fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|i| v[*i].clone()).collect()
}

/// Examples that carry a loss in a batch (the task's normaliser).
fn labelled(b: &FinetuneBatch) -> usize {
    match &b.labels {
        TaskLabels::Classes(c) => c.len(),
        TaskLabels::Tokens(t) => t.iter().filter(|l| **l != IGNORE).count(),
        TaskLabels::Spans { start, .. } => start.len(),
        TaskLabels::None => 0,
    }
}

fn task_config_json(model: &TaskModel, labels: &[String]) -> anyhow::Result<Vec<u8>> {
    Ok(model
        .hf_config(labels)?
        .to_hf_json(model.head.architecture()))
}

pub fn run_finetune(a: proto::Assignment, ctx: Ctx, cfg: JobConfig) -> anyhow::Result<()> {
    let stage = cfg.stages[a.stage_index as usize].clone();
    let tokenizer = Tokenizer::from_json(&a.tokenizer_json)?;
    let mut model_cfg: BertConfig =
        serde_json::from_str(&a.model_config_json).context("model config")?;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let seed = cfg.job.seed;
    let job_id = cfg.job.name.clone();
    let scratch = std::env::temp_dir().join(format!(
        "tandem-stage-{}-{}-{}",
        std::process::id(),
        a.generation,
        a.stage_index
    ));
    std::fs::create_dir_all(&scratch)?;
    set_phase(&ctx, "preparing data");
    let fetch = |role: &str| {
        let mut c = ctx.client.clone();
        ctx.rt.block_on(client::fetch_stage_file(
            &mut c,
            &job_id,
            a.generation,
            a.stage_index,
            role,
        ))
    };
    let data = TaskData::load(
        stage.kind,
        &a.stage_files,
        fetch,
        &tokenizer,
        &stage,
        &scratch,
    )?;
    let _ = std::fs::remove_dir_all(&scratch);
    let head = data.head();
    let labels = data.label_names();
    let mut ring = connect_collective(&a, &ctx, &cfg)?;

    // The model: resume this stage, or start it from the encoder checkpoint.
    set_phase(&ctx, "initialising model");
    let mut c = ctx.client.clone();
    let (mut model, adam, mut state) = if !a.init_checkpoint.is_empty() {
        let files: HashMap<String, Vec<u8>> = ctx
            .rt
            .block_on(client::get_checkpoint(
                &mut c,
                &job_id,
                a.generation,
                &a.init_checkpoint,
            ))?
            .into_iter()
            .collect();
        model_cfg = serde_json::from_slice(&files[hf::CONFIG_FILE]).context("checkpoint config")?;
        let model = TaskModel::new(&model_cfg, head, seed, &ctx.device)?;
        let mut adam = AdamW::new(
            AdamWConfig {
                weight_decay: stage.weight_decay,
                ..Default::default()
            },
            &model.store,
        );
        let state = restore_store(&model.store, &mut adam, model_cfg.initializer_range, &files)?;
        tracing::info!(rank, checkpoint = %a.init_checkpoint, step = state.step, "resumed");
        (model, adam, state)
    } else {
        let model = if a.encoder_checkpoint.is_empty() {
            TaskModel::new(&model_cfg, head, seed, &ctx.device)?
        } else {
            let files: HashMap<String, Vec<u8>> = ctx
                .rt
                .block_on(client::get_checkpoint(
                    &mut c,
                    &job_id,
                    a.generation,
                    &a.encoder_checkpoint,
                ))?
                .into_iter()
                .collect();
            let tensors = hf::tensors_from_bytes(&files[hf::WEIGHTS_FILE], &a.encoder_checkpoint)?;
            let (m, report) = TaskModel::from_encoder_tensors(
                &model_cfg,
                tensors,
                std::path::Path::new(&a.encoder_checkpoint),
                head,
                seed,
                &ctx.device,
            )?;
            if rank == 0 {
                tracing::info!(from = %a.encoder_checkpoint, initialised = ?report.initialised, dropped = report.ignored.len(), "encoder loaded; task head initialised");
            }
            m
        };
        let adam = AdamW::new(
            AdamWConfig {
                weight_decay: stage.weight_decay,
                ..Default::default()
            },
            &model.store,
        );
        let state = TrainerState::start(a.stage_index, &stage.name, world as u32, a.generation);
        (model, adam, state)
    };
    model.set_precision(super::train::precision(&cfg, &ctx, rank));
    let place = UpdatePlace::for_device(model.store.device());
    let mut update = Updater::with_state(&model.store, adam, place)?;
    update.broadcast_params(&mut ring, 0, &model.store)?;

    let n = data.n_train();
    let per_step = stage.batch_size * stage.grad_accum * world;
    let steps_per_epoch = (n as u64).div_ceil(per_step as u64).max(1);
    if state.total_steps == 0 {
        state.total_steps = (steps_per_epoch * stage.epochs as u64)
            .min(stage.max_steps.unwrap_or(u64::MAX))
            .max(1);
    }
    let schedule = Schedule {
        peak_lr: stage.lr,
        warmup_steps: (state.total_steps as f64 * stage.warmup_fraction as f64).round() as u64,
        total_steps: state.total_steps,
        decay: stage.decay,
    };
    let metric = stage.best_metric().to_string();
    let mut best: Option<(f64, u32)> = None;
    let mut last_metrics = BTreeMap::new();
    // Per recent step: loss, examples right and examples labelled (all ranks).
    let (mut recent, mut examples) = (Recent::<(f32, f32, f32)>::new(), 0u64);
    let started = Instant::now();
    let bucket = ((cfg.cluster.bucket_mib * (1 << 20) as f64) / 4.0) as usize;
    let mut epoch = state.cursor.epoch;
    // A stage cut by max_steps still evaluates (and may export) what it trained.
    let mut stopped = false;
    // (Resumed from the cut's checkpoint, the stage is already over.)
    let over = |step: u64| stage.max_steps.is_some_and(|m| step >= m);
    while epoch < stage.epochs && !stopped && !over(state.step) {
        // Every example once per epoch: a seeded permutation, dealt round-robin.
        let mut order: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(
            order.as_mut_slice(),
            &mut util::rng(&[seed, a.stage_index as u64, epoch as u64]),
        );
        let mine: Vec<usize> = order.iter().copied().skip(rank).step_by(world).collect();
        if !state.planned.iter().any(|(e, _)| *e == epoch) {
            state.planned.push((epoch, n as u64));
        }
        let q = stage.batch_size * stage.grad_accum;
        let mut consumed = n as u64;
        set_phase(&ctx, "training");
        for s in 0..steps_per_epoch as usize {
            if ctx.abort.load(Ordering::SeqCst) {
                anyhow::bail!("aborted by the coordinator");
            }
            let take: Vec<usize> = mine.iter().copied().skip(s * q).take(q).collect();
            let micro: Vec<FinetuneBatch> = take
                .chunks(stage.batch_size)
                .map(|c| data.batch(c, tokenizer.pad_id()))
                .collect::<anyhow::Result<_>>()?;
            let mut count = [micro.iter().map(labelled).sum::<usize>() as f32];
            ring.all_reduce_sum(&mut count)?;
            let w = if count[0] > 0.0 { 1.0 / count[0] } else { 0.0 };
            update.zero_grad()?;
            let mut sums = [
                0f32,
                0.0,
                micro.iter().map(|b| b.batch).sum::<usize>() as f32,
            ];
            for (i, b) in micro.iter().enumerate() {
                let mut rng = util::rng(&[
                    seed,
                    a.stage_index as u64,
                    state.step,
                    rank as u64,
                    i as u64,
                ]);
                let out = model.forward(b, &mut Some(&mut rng))?;
                let loss = out.loss_sum.mul(&Tensor::new(w, out.loss_sum.device())?)?;
                let grads = loss.backward()?;
                update.accumulate(&model.store, &grads)?;
                sums[0] += out.loss_sum.to_scalar::<f32>()?;
                sums[1] += out.correct as f32;
            }
            update.all_reduce(&mut ring, bucket)?;
            ring.all_reduce_sum(&mut sums)?;
            let lr = schedule.lr(state.step);
            update.apply(&model.store, &mut ring, stage.max_grad_norm, lr, state.step)?;
            state.step += 1;
            examples += sums[2] as u64;
            recent.push((sums[0] * w, sums[1], count[0]));
            let mut p = ctx.progress.lock().unwrap();
            p.epoch = epoch;
            p.step = state.step;
            p.total_steps = state.total_steps;
            // Loss and training accuracy over the recent steps (one step's is too noisy).
            let (loss, right, seen) =
                (recent.iter()).fold((0f32, 0f32, 0f32), |t, s| (t.0 + s.0, t.1 + s.1, t.2 + s.2));
            p.loss = loss / recent.len() as f32;
            p.mlm_accuracy = if seen > 0.0 { right / seen } else { 0.0 };
            p.examples = examples;
            p.samples_per_s = (examples as f64 / started.elapsed().as_secs_f64().max(1e-9)) as f32;
            if rank == 0 && state.step % cfg.cluster.progress_every == 0 {
                let record = proto::StepRecord {
                    step: state.step,
                    epoch,
                    loss: sums[0] * w,
                    lr,
                    samples_per_s: p.samples_per_s,
                    ..Default::default()
                };
                super::train::log_step(&mut p, record);
            }
            drop(p);
            if over(state.step) {
                // Stopped mid-epoch: the epoch's first (s + 1) steps' examples were used
                // (ranks deal the order round-robin, so they are its first positions).
                consumed = (((s + 1) * per_step) as u64).min(n as u64);
                stopped = true;
                break;
            }
        }
        state.ledger.push(LedgerRange {
            epoch,
            partitions: 1,
            partition: 0,
            start: 0,
            end: consumed,
        });
        // Dev evaluation across ranks: each scores its share, the counts are summed.
        set_phase(&ctx, "evaluating");
        let counts = data.evaluate(&model, &tokenizer, rank, world)?;
        let mut v = counts.to_vec();
        ring.all_reduce_sum(&mut v)?;
        let total = MetricCounts::from_vec(counts.kind(), &v)?;
        last_metrics = total
            .summary()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let score = last_metrics.get(metric.as_str()).copied().unwrap_or(0.0);
        tracing::info!(rank, epoch, ?last_metrics, "dev evaluation");
        epoch += 1;
        state.cursor = DataCursor {
            epoch,
            ..Default::default()
        };
        let improved = best.is_none_or(|(b, _)| score > b);
        if improved {
            best = Some((score, epoch - 1));
        }
        ctx.progress.lock().unwrap().metrics_json = serde_json::to_string(&last_metrics)?;
        if rank == 0 {
            let files = store_files(
                &model.store,
                task_config_json(&model, &labels)?,
                &*update.adamw(&model.store)?,
                &state,
            )?;
            let mut c = ctx.client.clone();
            set_phase(&ctx, "checkpoint");
            // An improved epoch's checkpoint is stored once, as the stage's best; it is also
            // a resume point like any other (the newest checkpoint of the stage wins).
            let name = if improved {
                format!("stage{}-best", a.stage_index)
            } else {
                checkpoint_name(&state)
            };
            ctx.rt.block_on(client::put_checkpoint(
                &mut c,
                &job_id,
                a.generation,
                &name,
                &files,
            ))?;
        }
    }
    set_phase(&ctx, "finishing");
    state.stage_done = true;
    if rank == 0 {
        let files = store_files(
            &model.store,
            task_config_json(&model, &labels)?,
            &*update.adamw(&model.store)?,
            &state,
        )?;
        let mut c = ctx.client.clone();
        ctx.rt.block_on(client::put_checkpoint(
            &mut c,
            &job_id,
            a.generation,
            &checkpoint_name(&state),
            &files,
        ))?;
    }
    let fingerprint = model.store.fingerprint()?;
    let mut done = ctx.progress.lock().unwrap().clone();
    let mut m = serde_json::json!({ "final": last_metrics, "metric": metric });
    if let Some((score, e)) = best {
        m["best"] = serde_json::json!({ "score": score, "epoch": e });
    }
    done.metrics_json = m.to_string();
    report_done(&ctx, done, fingerprint, state.step)?;
    let _ = ring.barrier();
    Ok(())
}
