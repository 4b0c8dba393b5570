//! Exact data-parallel semantics for every stage kind: 2 ranks × batch b over the real TCP ring
//! follow the same trajectory as 1 rank × batch 2b (dropout off, same seed, same examples per
//! step), sharded and unsharded; on a device update path every gradient bucket goes through
//! the collective's tensor all-reduce (NCCL's path on a GPU); and the GPU's update path (flat
//! device tensors, tensor-op AdamW, tensor all-reduce) does exactly what the CPU's host path
//! does.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use tandem::bench::synthetic_batch;
use tandem::comm::ring::{Ring, RingConfig};
use tandem::comm::{Collective, Local};
use tandem::data::batch::{FinetuneBatch, PretrainBatch};
use tandem::model::{BertConfig, PretrainModel, TaskHead, TaskModel};
use tandem::train::checkpoint::{checkpoint_files, restore, TrainerState};
use tandem::train::step::DEFAULT_BUCKET_ELEMS;
use tandem::train::{
    AdamWConfig, Decay, Schedule, StageModel, StepOptions, StepStats, TaskStats, Trainer,
    UpdatePlace,
};

const STEPS: usize = 5;
/// Rows of each step's global batch (b = 3 per rank on two ranks).
const ROWS: usize = 6;
const SEQ: usize = 16;

fn cfg() -> BertConfig {
    let mut c = BertConfig::new(60, 32, 2, 2, 64);
    c.max_position_embeddings = 32;
    c
}

fn options(bucket_elems: usize) -> StepOptions {
    StepOptions {
        adamw: AdamWConfig::default(),
        schedule: Schedule {
            peak_lr: 1e-3,
            warmup_steps: 2,
            total_steps: 10,
            decay: Decay::Linear,
        },
        max_grad_norm: 1.0,
        bucket_elems,
        seed: 9,
        dropout: false,
        dropout_stream: None,
    }
}

/// A stage kind's batch, cut into the rows each rank takes.
trait Rows: Clone + Send + 'static {
    fn rows(&self, r: std::ops::Range<usize>) -> Self;
}
impl Rows for PretrainBatch {
    fn rows(&self, r: std::ops::Range<usize>) -> Self {
        PretrainBatch::rows(self, r)
    }
}
impl Rows for FinetuneBatch {
    fn rows(&self, r: std::ops::Range<usize>) -> Self {
        FinetuneBatch::rows(self, r)
    }
}

/// A stage kind's step statistics: its loss.
trait Loss {
    fn loss(&self) -> f32;
}
impl Loss for StepStats {
    fn loss(&self) -> f32 {
        self.loss
    }
}
impl Loss for TaskStats {
    fn loss(&self) -> f32 {
        self.loss
    }
}

/// Makes the same freshly initialised model on every call.
type Make<M> = Arc<dyn Fn() -> M + Send + Sync>;

fn pretrain_model() -> Make<PretrainModel> {
    Arc::new(|| PretrainModel::new(&cfg(), 3, &Device::Cpu).unwrap())
}

fn task_model(head: TaskHead) -> Make<TaskModel> {
    Arc::new(move || TaskModel::new(&cfg(), head, 3, &Device::Cpu).unwrap())
}

fn pretrain_batches() -> Vec<PretrainBatch> {
    // Uneven MLM counts between the halves, so normalising per rank would give a different
    // answer than normalising by the global count.
    (0..STEPS)
        .map(|s| synthetic_batch(&cfg(), ROWS, SEQ, 50 + s as u64))
        .collect()
}

/// The fine-tuning kinds: name, head and each step's global batch. Rows are padded to
/// different lengths, and token classification labels a different number of positions in
/// each half, so a per-rank mean would differ from the global one.
fn task_cases() -> Vec<(&'static str, TaskHead, Vec<FinetuneBatch>)> {
    let kinds: [(&str, TaskHead); 4] = [
        (
            "sequence_classification",
            TaskHead::SequenceClassification { num_labels: 3 },
        ),
        (
            "sentence_pairs",
            TaskHead::SequenceClassification { num_labels: 2 },
        ),
        (
            "token_classification",
            TaskHead::TokenClassification { num_labels: 5 },
        ),
        ("question_answering", TaskHead::QuestionAnswering),
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(k, (name, head))| {
            let batches = (0..STEPS)
                .map(|s| task_batch(name, head, 100 * k as u64 + s as u64))
                .collect();
            (name, head, batches)
        })
        .collect()
}

/// A synthetic batch of `name`'s kind (two segments for pairs and QA).
fn task_batch(name: &str, head: TaskHead, seed: u64) -> FinetuneBatch {
    let pair = name == "sentence_pairs" || name == "question_answering";
    tandem::bench::synthetic_task_batch(head, pair, (ROWS, SEQ), 60, seed)
}

/// The ring wrapped so that each kind of call is counted: what a step sends through the
/// tensor all-reduce (NCCL's path on a GPU) and through the host all-reduce.
struct Recording {
    inner: Ring,
    /// Floats and calls of the tensor all-reduce.
    tensor_floats: usize,
    tensor_buckets: usize,
    /// The largest host all-reduce.
    largest_host: usize,
}

impl Collective for Recording {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> tandem::Result<()> {
        self.largest_host = self.largest_host.max(buf.len());
        self.inner.all_reduce_sum(buf)
    }
    fn all_reduce_sum_tensors(&mut self, ts: &[Tensor]) -> tandem::Result<Vec<Tensor>> {
        self.tensor_buckets += ts.len();
        self.tensor_floats += ts.iter().map(|t| t.elem_count()).sum::<usize>();
        tandem::comm::tensors_through_host(&mut self.inner, ts)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> tandem::Result<()> {
        self.largest_host = self.largest_host.max(buf.len());
        self.inner.reduce_scatter_sum(buf)
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> tandem::Result<()> {
        self.inner.all_gather(buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> tandem::Result<()> {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&mut self) -> tandem::Result<()> {
        self.inner.barrier()
    }
}

/// How one rank of [`two_ranks`] ended.
struct RankEnd {
    losses: Vec<f32>,
    params: Vec<f32>,
    /// AdamW's first moment before and after `gather_state`.
    m_before: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// What went through the collective (see [`Recording`]).
    tensor_floats: usize,
    tensor_buckets: usize,
    largest_host: usize,
}

/// How a run of [`two_ranks`] updates.
#[derive(Clone, Copy)]
struct Run {
    place: UpdatePlace,
    sharded: bool,
    max_grad_norm: f32,
}

const PLAIN: Run = Run {
    place: UpdatePlace::Host,
    sharded: false,
    max_grad_norm: 1.0,
};

/// Each of `batches` split in halves over two ranks joined by a real ring (buckets of 1000
/// floats, so the gradient crosses it in many pieces): every rank's losses, final state and
/// what it sent through the collective.
fn two_ranks<M>(make: &Make<M>, batches: &[M::Batch], run: Run) -> Vec<RankEnd>
where
    M: StageModel + 'static,
    M::Batch: Rows,
    M::Stats: Loss,
{
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (peers, batches, make) = (peers.clone(), batches.to_vec(), make.clone());
            std::thread::spawn(move || {
                let mut rc = RingConfig::new(rank, 2, peers, "equivalence", 1);
                rc.timeout = Duration::from_secs(20);
                let mut comm = Recording {
                    inner: Ring::connect(rc, l).unwrap(),
                    tensor_floats: 0,
                    tensor_buckets: 0,
                    largest_host: 0,
                };
                let mut o = options(1000);
                o.max_grad_norm = run.max_grad_norm;
                let mut t = Trainer::with_update_place(make(), o, run.place).unwrap();
                t.set_sharded(run.sharded);
                t.broadcast_params(&mut comm, 0).unwrap();
                let losses: Vec<f32> = batches
                    .iter()
                    .map(|b| {
                        let half = ROWS / 2;
                        let mine = if rank == 0 {
                            b.rows(0..half)
                        } else {
                            b.rows(half..ROWS)
                        };
                        t.train_step(&[mine], &mut comm).unwrap().loss()
                    })
                    .collect();
                let m_before = t.adamw().unwrap().m.clone();
                t.gather_state(&mut comm).unwrap();
                let opt = t.adamw().unwrap();
                RankEnd {
                    m_before,
                    losses,
                    params: t.model.store().to_flat().unwrap(),
                    m: opt.m.clone(),
                    v: opt.v.clone(),
                    tensor_floats: comm.tensor_floats,
                    tensor_buckets: comm.tensor_buckets,
                    largest_host: comm.largest_host,
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// One rank updating at `place` over `batches` whole, clipping at `max_grad_norm`.
fn one_rank<M: StageModel>(
    make: &Make<M>,
    batches: &[M::Batch],
    place: UpdatePlace,
    max_grad_norm: f32,
) -> (Trainer<M>, Vec<f32>)
where
    M::Stats: Loss,
{
    let mut o = options(DEFAULT_BUCKET_ELEMS);
    o.max_grad_norm = max_grad_norm;
    let mut t = Trainer::with_update_place(make(), o, place).unwrap();
    let losses = batches
        .iter()
        .map(|b| {
            t.train_step(std::slice::from_ref(b), &mut Local)
                .unwrap()
                .loss()
        })
        .collect();
    (t, losses)
}

/// 2 ranks × b against 1 rank × 2b for one stage kind, sharded and unsharded: the same loss
/// at every step (relative 1e-5), the same final weights (1e-5), replicas bit-identical.
fn check_equivalence<M>(kind: &str, make: &Make<M>, batches: &[M::Batch])
where
    M: StageModel + 'static,
    M::Batch: Rows,
    M::Stats: Loss,
{
    let (single, single_losses) = one_rank(make, batches, UpdatePlace::Host, 1.0);
    let single_params = single.model.store().to_flat().unwrap();
    assert!(
        single_params != make().store().to_flat().unwrap(),
        "{kind}: the run trained"
    );
    for sharded in [false, true] {
        let what = format!("{kind}, sharded {sharded}");
        let ranks = two_ranks(make, batches, Run { sharded, ..PLAIN });
        for (rank, r) in ranks.iter().enumerate() {
            for (s, (a, b)) in r.losses.iter().zip(&single_losses).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "{what}: rank {rank} step {s}: loss {a} vs single {b}"
                );
            }
        }
        assert_same(
            &ranks[0].params,
            &ranks[1].params,
            &format!("{what}: replicas"),
        );
        let worst = max_diff(&ranks[0].params, &single_params);
        assert!(
            worst < 1e-5,
            "{what}: 2 ranks vs 1 rank: weights differ by {worst}"
        );
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn pretraining_two_ranks_with_batch_b_equal_one_rank_with_batch_2b() {
    check_equivalence("pretrain", &pretrain_model(), &pretrain_batches());
}

#[test]
fn every_fine_tuning_kind_two_ranks_with_batch_b_equal_one_rank_with_batch_2b() {
    for (kind, head, batches) in task_cases() {
        check_equivalence(kind, &task_model(head), &batches);
    }
}

/// On the device update path (a model on a GPU), every gradient bucket of every step goes
/// through the collective's tensor all-reduce, which NCCL overrides; the host all-reduce only
/// carries the few floats of the label counts and the step's sums.
fn check_buckets_take_the_tensor_path<M>(kind: &str, make: &Make<M>, batches: &[M::Batch])
where
    M: StageModel + 'static,
    M::Batch: Rows,
    M::Stats: Loss,
{
    let params = make().store().to_flat().unwrap().len();
    let run = Run {
        place: UpdatePlace::Device,
        ..PLAIN
    };
    for (rank, r) in two_ranks(make, batches, run).iter().enumerate() {
        assert_eq!(
            r.tensor_floats,
            STEPS * params,
            "{kind}: rank {rank}: floats through the tensor all-reduce"
        );
        assert_eq!(
            r.tensor_buckets,
            STEPS * params.div_ceil(1000),
            "{kind}: rank {rank}: buckets through the tensor all-reduce"
        );
        assert!(
            r.largest_host < 16,
            "{kind}: rank {rank}: a host all-reduce of {} floats",
            r.largest_host
        );
    }
}

#[test]
fn every_stage_kind_sends_every_gradient_bucket_through_the_tensor_all_reduce() {
    check_buckets_take_the_tensor_path("pretrain", &pretrain_model(), &pretrain_batches());
    for (kind, head, batches) in task_cases() {
        check_buckets_take_the_tensor_path(kind, &task_model(head), &batches);
    }
}

/// The sharded optimiser step (ZeRO stage 1: reduce-scatter, each rank's own part clipped
/// and updated, all-gather): with clipping off, bit for bit the unsharded run — weights and,
/// once gathered, both AdamW moments, on both ranks; with clipping on every step, within
/// float rounding of it (the clipping norm's partial sums are added in another order) and
/// still bit-identical between the ranks.
#[test]
fn a_sharded_optimiser_step_matches_the_unsharded_one() {
    let (make, batches) = (pretrain_model(), pretrain_batches());
    for max_grad_norm in [0.0, 0.05] {
        let plain = two_ranks(
            &make,
            &batches,
            Run {
                max_grad_norm,
                ..PLAIN
            },
        );
        let sharded = two_ranks(
            &make,
            &batches,
            Run {
                sharded: true,
                max_grad_norm,
                ..PLAIN
            },
        );
        // Each sharded rank updated its own half of the state only (the other half is still
        // zero until gathered); the unsharded ranks updated all of it.
        for r in 0..2 {
            let (before, after) = (&sharded[r].m_before, &sharded[r].m);
            let kept = (0..after.len()).filter(|&i| before[i] == after[i]).count();
            let zero = before.iter().filter(|x| **x == 0.0).count();
            assert!(
                kept > after.len() / 3 && zero > after.len() / 3 && kept + zero >= after.len(),
                "rank {r}: {kept} kept, {zero} zero of {}",
                after.len()
            );
            assert_same(&plain[r].m_before, &plain[r].m, "unsharded moments");
            assert_same(&sharded[r].params, &sharded[0].params, "ranks' weights");
            assert_same(&sharded[r].m, &sharded[0].m, "ranks' first moments");
            assert_same(&sharded[r].v, &sharded[0].v, "ranks' second moments");
        }
        let (a, b) = (&sharded[0], &plain[0]);
        if max_grad_norm == 0.0 {
            assert_same(&a.params, &b.params, "sharded vs unsharded weights");
            assert_same(&a.m, &b.m, "sharded vs unsharded first moments");
            assert_same(&a.v, &b.v, "sharded vs unsharded second moments");
            assert_eq!(a.losses, b.losses);
        } else {
            let worst = max_diff(&a.params, &b.params);
            assert!(worst < 1e-6, "clipped: weights differ by {worst}");
            assert!(
                a.params != make().store.to_flat().unwrap(),
                "the run trained"
            );
        }
    }
}

/// The device update path against the host path, bit for bit, for one stage kind.
fn check_device_matches_host<M>(kind: &str, make: &Make<M>, batches: &[M::Batch])
where
    M: StageModel + 'static,
    M::Batch: Rows,
    M::Stats: Loss,
{
    // Clipping off, and clipping on every step (the gradient norm is well above 0.05).
    for max_norm in [0.0, 0.05] {
        let (host, _) = one_rank(make, batches, UpdatePlace::Host, max_norm);
        let (dev, _) = one_rank(make, batches, UpdatePlace::Device, max_norm);
        assert_eq!(host.update_place(), UpdatePlace::Host);
        assert_eq!(dev.update_place(), UpdatePlace::Device);
        let what = format!("{kind}: after {STEPS} steps, max_grad_norm {max_norm}");
        assert_same(
            &host.model.store().to_flat().unwrap(),
            &dev.model.store().to_flat().unwrap(),
            &format!("weights {what}"),
        );
        assert_same(
            &host.last_grad().unwrap(),
            &dev.last_grad().unwrap(),
            &format!("gradient {what}"),
        );
        let (a, b) = (host.adamw().unwrap(), dev.adamw().unwrap());
        assert_same(&a.m, &b.m, &format!("first moment {what}"));
        assert_same(&a.v, &b.v, &format!("second moment {what}"));
        assert_eq!(a.t, b.t);
        assert!(a.t == STEPS as u64 && a.v.iter().any(|v| *v > 0.0));
    }
    // Two ranks over the ring, gradients all-reduced as tensors: the same as the host path.
    let host = two_ranks(make, batches, PLAIN);
    let run = Run {
        place: UpdatePlace::Device,
        ..PLAIN
    };
    let dev = two_ranks(make, batches, run);
    for (rank, (h, d)) in host.iter().zip(&dev).enumerate() {
        assert_eq!(h.losses, d.losses, "{kind}: rank {rank}: losses");
        assert_same(
            &h.params,
            &d.params,
            &format!("{kind}: rank {rank}: weights over the ring"),
        );
    }
}

#[test]
fn the_device_update_path_matches_the_host_path_bit_for_bit() {
    let (make, batches) = (pretrain_model(), pretrain_batches());
    check_device_matches_host("pretrain", &make, &batches);
    // The clipped run really clipped (so the comparison covered clipping).
    let (mut t, _) = one_rank(&make, &batches[..1], UpdatePlace::Device, 0.05);
    let s = t
        .train_step(std::slice::from_ref(&batches[1]), &mut Local)
        .unwrap();
    assert!(s.grad_norm > 0.05, "norm {}", s.grad_norm);
    for (kind, head, batches) in task_cases() {
        check_device_matches_host(kind, &task_model(head), &batches);
    }
}

/// Bit-for-bit equality, reporting the first difference instead of both buffers.
fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: element {i} differs: {} vs {}", a[i], b[i]);
    }
}

#[test]
fn a_device_path_checkpoint_resumes_on_the_host_path_and_back() {
    let (make, batches) = (pretrain_model(), pretrain_batches());
    let (head, rest) = batches.split_at(3);
    let (reference, _) = one_rank(&make, &batches, UpdatePlace::Host, 1.0);
    for (from, to) in [
        (UpdatePlace::Device, UpdatePlace::Host),
        (UpdatePlace::Host, UpdatePlace::Device),
    ] {
        let (first, _) = one_rank(&make, head, from, 1.0);
        let mut state = TrainerState::start(0, "pretrain", 1, 1);
        state.step = 3;
        state.total_steps = 10;
        let files = checkpoint_files(&first, &state).unwrap();
        let files = files.into_iter().collect();
        // Different initial weights: everything must come from the checkpoint.
        let mut t = Trainer::with_update_place(
            PretrainModel::new(&cfg(), 77, &Device::Cpu).unwrap(),
            options(DEFAULT_BUCKET_ELEMS),
            to,
        )
        .unwrap();
        restore(&mut t, &files).unwrap();
        for b in rest {
            t.train_step(std::slice::from_ref(b), &mut Local).unwrap();
        }
        assert_same(
            &t.model.store.to_flat().unwrap(),
            &reference.model.store.to_flat().unwrap(),
            &format!("{from:?} -> {to:?}"),
        );
    }
}
