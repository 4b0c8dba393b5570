//! `tandem bench`: measurements that print numbers (never timed tests).

#![warn(missing_docs)]

use std::time::Instant;

use serde::Serialize;

use crate::comm::Local;
use crate::data::batch::{FinetuneBatch, PretrainBatch, TaskLabels, IGNORE};
use crate::error::Result;
use crate::model::{BertConfig, Preset, PretrainModel, TaskHead};
use crate::train::{AdamWConfig, Decay, Schedule, StepOptions, Trainer};
use crate::util;

/// Result line of `tandem bench step`.
#[derive(Debug, Serialize)]
pub struct StepBench {
    /// The model size measured.
    pub preset: Preset,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// CPU threads candle ran with.
    pub threads: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median step time (ms).
    pub ms_per_step: f64,
    /// Fastest step (ms).
    pub ms_min: f64,
    /// Slowest step (ms).
    pub ms_max: f64,
    /// Sequences per second at the median step time.
    pub samples_per_s: f64,
    /// Achieved GFLOP/s, counting the FLOPs of HF `BertForPreTraining` (MLM decoder at every
    /// position), so the figure compares directly with PyTorch's.
    pub gflops: f64,
    /// Achieved GFLOP/s of what is executed (MLM head at the masked positions only): the
    /// figure an MFU against the hardware's peak should use.
    pub executed_gflops: f64,
    /// Whether f32 matmuls ran on TF32 tensor cores.
    pub tf32: bool,
    /// The MLM decoder here runs only at masked positions (same loss and gradients).
    pub mlm_decoder: &'static str,
    /// The compute precision (`f32` or `bf16`).
    pub precision: crate::model::Precision,
    /// Peak resident set size of the process (MiB).
    pub peak_rss_mib: f64,
    /// Number of model parameters.
    pub params: usize,
    /// Median time of each part of the step (ms).
    pub phases: crate::train::step::PhaseTimes,
}

/// Forward FLOPs of HF `BertForPreTraining` for one batch (multiply-add = 2 FLOPs).
pub fn pretraining_forward_flops(cfg: &BertConfig, batch: usize, seq: usize) -> f64 {
    let (b, t, h, i, v) = (
        batch as f64,
        seq as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.vocab_size as f64,
    );
    let per_layer = 2.0 * b * t * (4.0 * h * h + 2.0 * h * i) + 2.0 * 2.0 * b * t * t * h;
    let heads = 2.0 * b * t * h * h + 2.0 * b * t * h * v + 2.0 * b * h * h + 2.0 * b * h * 2.0;
    cfg.num_hidden_layers as f64 * per_layer + heads
}

/// Forward FLOPs of the MLM head (transform `hidden → hidden` and decoder `hidden → vocab`) at
/// `rows` positions: what HF's count includes at the unmasked positions and tandem does not
/// execute.
fn mlm_head_flops(cfg: &BertConfig, rows: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    2.0 * rows as f64 * h * (h + cfg.vocab_size as f64)
}

/// A random fine-tuning batch for `head`: rows `[CLS] … [SEP]` padded at random lengths (6 to
/// `seq` tokens), in two segments when `pair`, ids in `5..vocab`; labels as the head takes
/// them (token classification labels about 70 % of the positions, as words' first sub-tokens;
/// QA spans lie in the second segment, a fifth of the questions unanswerable).
pub fn synthetic_task_batch(
    head: TaskHead,
    pair: bool,
    (batch, seq): (usize, usize),
    vocab: u32,
    seed: u64,
) -> FinetuneBatch {
    use rand::Rng;
    let mut rng = util::rng(&[seed]);
    let n = batch * seq;
    let (mut ids, mut types, mut mask) = (vec![0u32; n], vec![0u32; n], vec![0u32; n]);
    let mut lens = vec![];
    for r in 0..batch {
        let len = rng.random_range(6..=seq.max(6));
        lens.push(len);
        for j in 0..len {
            let i = r * seq + j;
            mask[i] = 1;
            ids[i] = match j {
                0 => 2,
                _ if j == len - 1 => 3,
                _ => rng.random_range(5..vocab),
            };
            types[i] = u32::from(pair && j > len / 2);
        }
    }
    let labels = match head {
        TaskHead::SequenceClassification { num_labels } => TaskLabels::Classes(
            (0..batch)
                .map(|_| rng.random_range(0..num_labels as u32))
                .collect(),
        ),
        TaskHead::TokenClassification { num_labels } => {
            let mut l = vec![IGNORE; n];
            for (r, &len) in lens.iter().enumerate() {
                for j in 1..len - 1 {
                    if rng.random_bool(0.7) {
                        l[r * seq + j] = rng.random_range(0..num_labels as i64);
                    }
                }
            }
            TaskLabels::Tokens(l)
        }
        TaskHead::QuestionAnswering => {
            let (mut start, mut end) = (vec![], vec![]);
            for &len in &lens {
                let s = if rng.random_bool(0.2) {
                    0
                } else {
                    rng.random_range(len / 2 + 1..len - 1)
                };
                let e = if s == 0 {
                    0
                } else {
                    rng.random_range(s..len - 1)
                };
                start.push(s as u32);
                end.push(e as u32);
            }
            TaskLabels::Spans { start, end }
        }
    };
    FinetuneBatch {
        batch,
        seq,
        input_ids: ids,
        token_type_ids: types,
        attention_mask: mask,
        labels,
    }
}

/// A random pre-training batch: 15% of the non-special positions labelled, random NSP.
pub fn synthetic_batch(cfg: &BertConfig, batch: usize, seq: usize, seed: u64) -> PretrainBatch {
    use rand::Rng;
    let mut rng = util::rng(&[seed]);
    let n = batch * seq;
    let vocab = cfg.vocab_size as u32;
    let mut input_ids = Vec::with_capacity(n);
    let mut token_type_ids = Vec::with_capacity(n);
    let mut labels = vec![IGNORE; n];
    for _ in 0..batch {
        let split = seq / 2;
        for j in 0..seq {
            input_ids.push(rng.random_range(5..vocab));
            token_type_ids.push(u32::from(j > split));
        }
    }
    let n_mask = ((seq as f64 * 0.15).round() as usize).max(1);
    for b in 0..batch {
        for _ in 0..n_mask {
            let j = rng.random_range(1..seq);
            labels[b * seq + j] = input_ids[b * seq + j] as i64;
            input_ids[b * seq + j] = 4;
        }
    }
    PretrainBatch {
        batch,
        seq,
        input_ids,
        token_type_ids,
        attention_mask: vec![1; n],
        mlm_labels: labels,
        nsp_labels: (0..batch).map(|_| rng.random_range(0..2)).collect(),
    }
}

/// `tandem bench step`.
#[derive(Debug, Clone, clap::Args)]
pub struct StepBenchOptions {
    /// Model size.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Sequences per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// CPU threads for candle.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// cpu, cuda or cuda:N (a CUDA device needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// f32 or bf16 (mixed precision; meant for GPUs, slow on the CPU).
    #[arg(long, default_value = "f32")]
    pub precision: crate::model::Precision,
    /// GPUs: f32 matmuls on TF32 tensor cores (`model.tf32`).
    #[arg(long)]
    pub tf32: bool,
}

/// Times full training steps (forward, backward, AdamW) after `warmup` untimed steps, on
/// `o.device` with `o.threads` threads (set by the caller before any candle op runs).
pub fn bench_step(o: &StepBenchOptions) -> Result<StepBench> {
    let (preset, threads, batch, seq, steps, warmup, precision) = (
        o.preset,
        o.threads,
        o.batch,
        o.seq,
        o.steps,
        o.warmup,
        o.precision,
    );
    if steps == 0 {
        return Err(crate::error::Error::Train(
            "bench step: --steps must be at least 1".into(),
        ));
    }
    let device = &util::parse_device(&o.device)?;
    if device.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(o.tf32);
    }
    let cfg = BertConfig::preset(preset);
    let mut model = PretrainModel::new(&cfg, 0, device)?;
    model.set_precision(precision);
    let params = model.store.numel();
    let options = StepOptions {
        adamw: AdamWConfig::default(),
        schedule: Schedule {
            peak_lr: 1e-4,
            warmup_steps: 0,
            total_steps: 1_000_000,
            decay: Decay::Linear,
        },
        max_grad_norm: 1.0,
        bucket_elems: crate::train::step::DEFAULT_BUCKET_ELEMS,
        seed: 0,
        dropout: true,
        dropout_stream: None,
    };
    let mut trainer = Trainer::new(model, options)?;
    let mut comm = Local;
    let mut times = Vec::with_capacity(steps);
    let mut phases = vec![];
    let mut masked_per_step = vec![];
    for s in 0..warmup + steps {
        let b = synthetic_batch(&cfg, batch, seq, s as u64);
        masked_per_step.push(b.mlm_count() as f64);
        let t0 = Instant::now();
        trainer.train_step(std::slice::from_ref(&b), &mut comm)?;
        if s >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            phases.push(trainer.phases);
        }
    }
    let med = |f: fn(&crate::train::step::PhaseTimes) -> f64| {
        util::median(&phases.iter().map(f).collect::<Vec<_>>())
    };
    let phases = crate::train::step::PhaseTimes {
        forward_ms: med(|p| p.forward_ms),
        backward_ms: med(|p| p.backward_ms),
        pack_ms: med(|p| p.pack_ms),
        sync_ms: med(|p| p.sync_ms),
        allreduce_ms: med(|p| p.allreduce_ms),
        optimizer_ms: med(|p| p.optimizer_ms),
    };
    let median = util::median(&times);
    times.sort_by(f64::total_cmp);
    let flops = 3.0 * pretraining_forward_flops(&cfg, batch, seq);
    let masked = util::median(&masked_per_step);
    let executed = flops - 3.0 * mlm_head_flops(&cfg, batch * seq - masked as usize);
    Ok(StepBench {
        preset,
        device: match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            other => format!("{other:?}"),
        },
        threads,
        batch,
        seq,
        steps,
        ms_per_step: median,
        ms_min: times[0],
        ms_max: *times.last().unwrap(),
        samples_per_s: batch as f64 / (median / 1e3),
        gflops: flops / (median / 1e3) / 1e9,
        executed_gflops: executed / (median / 1e3) / 1e9,
        tf32: o.tf32 && device.is_cuda(),
        mlm_decoder: "masked positions only",
        precision,
        peak_rss_mib: util::peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64,
        params,
        phases,
    })
}

/// `tandem bench allreduce`.
pub struct AllreduceBench {
    /// Message sizes to all-reduce, in bytes.
    pub sizes: Vec<usize>,
    /// Timed all-reduces per size (the median is reported).
    pub iters: usize,
    /// Ring chunk size in bytes.
    pub chunk_bytes: usize,
    /// How ranks exchange chunks.
    pub transport: crate::comm::ring::Transport,
    /// Which connections are sealed (AES-256-GCM).
    pub encryption: crate::comm::ring::Encryption,
}

impl AllreduceBench {
    /// The parent: spawns `world` rank processes of this binary on 127.0.0.1 and relays rank
    /// 0's JSON lines.
    pub fn run(&self, world: usize) -> anyhow::Result<()> {
        anyhow::ensure!(world >= 1, "--world must be at least 1");
        // Reserve free ports, release them, and let each rank bind its own.
        let ports: Vec<u16> = (0..world)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
            })
            .collect::<std::io::Result<_>>()?;
        let join = |v: Vec<String>| v.join(",");
        let ports_arg = join(ports.iter().map(|p| p.to_string()).collect());
        let sizes_arg = join(self.sizes.iter().map(|s| s.to_string()).collect());
        let exe = std::env::current_exe()?;
        let mut children: Vec<std::process::Child> = (0..world)
            .map(|r| {
                std::process::Command::new(&exe)
                    .args(["bench", "allreduce", "--rank", &r.to_string()])
                    .args(["--ports", &ports_arg, "--sizes", &sizes_arg])
                    .args(["--iters", &self.iters.to_string()])
                    .args(["--chunk-bytes", &self.chunk_bytes.to_string()])
                    .args(["--transport", self.transport.as_str()])
                    .args(["--encryption", self.encryption.as_str()])
                    .env("TANDEM_TOKEN", "bench")
                    .stdout(if r == 0 {
                        std::process::Stdio::inherit()
                    } else {
                        std::process::Stdio::null()
                    })
                    .spawn()
            })
            .collect::<std::io::Result<_>>()?;
        let mut ok = true;
        for c in &mut children {
            ok &= c.wait()?.success();
        }
        anyhow::ensure!(ok, "a rank failed");
        Ok(())
    }

    /// One rank.
    pub fn run_rank(&self, rank: usize, ports: &[u16]) -> anyhow::Result<()> {
        use crate::comm::ring::{bench_rank, bus_bandwidth_gbs, RingConfig, RingListener};
        let peers: Vec<std::net::SocketAddr> = ports
            .iter()
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        let listener = RingListener::bind(peers[rank])?;
        let mut cfg = RingConfig::new(rank, ports.len(), peers, "bench", 1);
        cfg.chunk_bytes = self.chunk_bytes;
        cfg.transport = self.transport;
        cfg.encryption = self.encryption;
        let world = ports.len();
        let (transport, results) = bench_rank(cfg, listener, &self.sizes, self.iters)?;
        for (bytes, ms) in results {
            if rank == 0 {
                println!(
                    "{}",
                    serde_json::json!({
                        "world": world, "bytes": bytes, "median_ms": ms,
                        "busbw_gbps": bus_bandwidth_gbs(bytes, world, ms / 1e3),
                        "chunk_bytes": self.chunk_bytes, "transport": transport,
                    })
                );
            }
        }
        Ok(())
    }
}

/// Result line of `tandem bench scaling`. Rates are medians over the rounds; the per-round
/// lists show the spread (this kind of shared VM drifts by ±10 % between runs).
#[derive(Debug, Serialize)]
pub struct ScalingBench {
    /// The options the bench ran with.
    #[serde(flatten)]
    pub options: ScalingOptions,
    /// Samples per second of the 1-worker runs.
    pub samples_per_s_1: f64,
    /// Samples per second of the N-worker runs (summed over workers).
    pub samples_per_s_n: f64,
    /// samples_per_s_n / (N · samples_per_s_1), from the medians.
    pub efficiency: f64,
    /// Each round's own efficiency (its N-worker run over its 1-worker run).
    pub efficiency_rounds: Vec<f64>,
    /// The machine's own ceiling, without tandem's runtime: `tandem bench step` (same preset,
    /// batch and sequence, 1 thread) alone, and N of them at once, independent of each other
    /// (no coordinator, no all-reduce): their summed samples/s.
    pub bare_samples_per_s_1: f64,
    /// The bare N-process figure: their summed samples/s.
    pub bare_samples_per_s_n: f64,
    /// bare_samples_per_s_n / (N · bare_samples_per_s_1): what N processes that never talk get
    /// from this machine (shared caches, memory bandwidth, cores).
    pub machine_efficiency: f64,
    /// efficiency / machine_efficiency: the part of the scaling loss due to the runtime.
    pub runtime_efficiency: f64,
    /// The N-worker runs' coordinator (medians): CPU seconds over the stage, and that as a
    /// share of the workers' capacity over the same time (coordinator_cpu_s / (wall_s · N)):
    /// the most the control plane can take from training when the workers fill the cores.
    pub coordinator_cpu_s: f64,
    /// The coordinator's CPU time as a share of the workers' capacity (see `coordinator_cpu_s`).
    pub coordinator_cpu_share: f64,
    /// The same over the training window only (rank 0's first to last progress report):
    /// the coordinator's cost while steps run, without set-up and the final checkpoint.
    pub coordinator_cpu_share_training: f64,
}

/// `tandem bench step` in `n` concurrent processes of 1 thread each: their samples/s, summed.
fn bare_steps(preset: &str, n: usize, batch: usize, seq: usize, steps: u64) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let children = (0..n)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["bench", "step", "--preset", preset, "--threads", "1"])
                .args(["--batch", &batch.to_string(), "--seq", &seq.to_string()])
                .args(["--steps", &steps.to_string(), "--warmup", "2"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .spawn()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut total = 0.0;
    for child in children {
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "bench step failed ({})", out.status);
        let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        total += line["samples_per_s"]
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("bench step printed no samples_per_s"))?;
    }
    Ok(total)
}

/// Writes the bundled corpus again with every `group` consecutive documents merged into one,
/// `copies` times over. Its documents (~80 tokens) are shorter than a 128-token instance, so
/// instances and their masked-token counts vary in length, and with them the work of each
/// rank's step; merged, every instance is full length, as in real pre-training text (and the
/// reference figures). The copies make an epoch longer than the run: at an epoch's end the
/// ranks' shares differ by up to a batch (a rank may even step with an empty batch), which on
/// a 77 KB corpus would happen every few steps and measure the corpus, not the runtime.
fn long_documents(
    from: &std::path::Path,
    to: &std::path::Path,
    group: usize,
    copies: usize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    let mut files: Vec<_> = std::fs::read_dir(from)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let docs: Vec<&str> = text
            .split("\n\n")
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        let merged: Vec<String> = docs.chunks(group).map(|g| g.join("\n")).collect();
        let name = f.file_name().expect("a file in a directory");
        let text = merged.join("\n\n") + "\n\n";
        std::fs::write(to.join(name), text.repeat(copies))?;
    }
    Ok(())
}

/// `tandem bench scaling`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ScalingOptions {
    /// Model size.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Workers in the N-worker runs.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Per-worker batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Optimiser steps per run (the first 2 are excluded from the rate).
    #[arg(long, default_value_t = 12)]
    pub steps: u64,
    /// Interleaved rounds (1 worker, N workers, bare steps); rates are their medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One run of the short job through `tandem launch` with `n` workers: its stage summary.
async fn scaling_run(
    o: &ScalingOptions,
    preset: &str,
    dir: &std::path::Path,
    corpus: &std::path::Path,
    n: usize,
) -> anyhow::Result<crate::coordinator::StageSummary> {
    let (seq, batch, steps) = (o.seq, o.batch, o.steps);
    let state = dir.join(format!("w{n}"));
    let _ = std::fs::remove_dir_all(&state);
    let cfg = format!(
        "[job]\nname = \"scaling\"\nstate_dir = {state:?}\n[cluster]\nmin_workers = {n}\nmax_workers = {n}\n\
         [model]\npreset = \"{preset}\"\nmax_position_embeddings = {seq}\n\
         [data]\ncorpus = [{corpus:?}]\nshard_size = \"4KiB\"\nvocab_size = 8192\n\
         [data.instances]\nmax_seq_length = {seq}\npad_to_max_length = true\n\
         [[stages]]\nname = \"pretrain\"\nkind = \"pretrain\"\nepochs = 1000\nbatch_size = {batch}\nlr = 1e-4\nmax_steps = {steps}\n",
        state = state.display().to_string(),
        corpus = corpus.display().to_string(),
    );
    let path = dir.join(format!("job{n}.toml"));
    std::fs::write(&path, cfg)?;
    let opts = crate::launch::LaunchOptions {
        config: path,
        workers: None,
        corpus: vec![],
        max_steps: None,
        state_dir: None,
        sets: vec![],
        threads: 1,
        device: "cpu".into(),
        no_progress: true,
        quiet: true,
        resume: false,
        insecure: false,
    };
    let code = crate::launch::run(opts, std::future::pending()).await?;
    anyhow::ensure!(code == 0, "the {n}-worker run failed (exit {code})");
    let s: crate::coordinator::Summary =
        serde_json::from_slice(&std::fs::read(state.join("summary.json"))?)?;
    s.stages
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the {n}-worker run has no stage"))
}

/// Runs the same short job through `tandem launch` with 1 and with `workers` workers, and
/// `bench step` alone and `workers` times at once, `rounds` times interleaved.
pub async fn scaling(o: ScalingOptions) -> anyhow::Result<ScalingBench> {
    anyhow::ensure!(o.rounds >= 1, "--rounds must be at least 1");
    let dir = std::env::temp_dir().join(format!("tandem-bench-scaling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bundled = std::path::Path::new("configs/data/corpus");
    anyhow::ensure!(
        bundled.exists(),
        "run from the repository root (needs configs/data/corpus)"
    );
    let corpus = dir.join("corpus");
    long_documents(bundled, &corpus, 10, 8)?;
    let preset_name = serde_json::to_value(o.preset)?
        .as_str()
        .unwrap_or("tiny")
        .to_string();
    let n = o.workers;
    // Throughput of n workers over n times that of one.
    let eff = |one: f64, many: f64| many / (n as f64 * one);
    let (mut r1, mut rn, mut b1, mut bn) = (vec![], vec![], vec![], vec![]);
    let (mut cpu, mut share, mut share_training) = (vec![], vec![], vec![]);
    for round in 0..o.rounds {
        let one = scaling_run(&o, &preset_name, &dir, &corpus, 1).await?;
        let many = scaling_run(&o, &preset_name, &dir, &corpus, n).await?;
        r1.push(one.samples_per_s as f64);
        rn.push(many.samples_per_s as f64);
        if let (Some(c), Some(w)) = (many.coordinator_cpu_s, many.wall_s) {
            cpu.push(c);
            share.push(c / (w * n as f64));
        }
        if let (Some(c), Some(w)) = (many.coordinator_cpu_training_s, many.training_window_s) {
            share_training.push(c / (w * n as f64).max(1e-9));
        }
        b1.push(bare_steps(&preset_name, 1, o.batch, o.seq, o.steps)?);
        bn.push(bare_steps(&preset_name, n, o.batch, o.seq, o.steps)?);
        tracing::info!(
            round,
            samples_per_s_1 = r1[round],
            samples_per_s_n = rn[round],
            efficiency = eff(r1[round], rn[round]),
            "scaling round done"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (m1, mn) = (util::median(&r1), util::median(&rn));
    let (bare_1, bare_n) = (util::median(&b1), util::median(&bn));
    let (efficiency, machine_efficiency) = (eff(m1, mn), eff(bare_1, bare_n));
    Ok(ScalingBench {
        samples_per_s_1: m1,
        samples_per_s_n: mn,
        efficiency,
        efficiency_rounds: r1.iter().zip(&rn).map(|(a, b)| eff(*a, *b)).collect(),
        bare_samples_per_s_1: bare_1,
        bare_samples_per_s_n: bare_n,
        machine_efficiency,
        runtime_efficiency: efficiency / machine_efficiency,
        coordinator_cpu_s: util::median(&cpu),
        coordinator_cpu_share: util::median(&share),
        coordinator_cpu_share_training: util::median(&share_training),
        options: o,
    })
}
