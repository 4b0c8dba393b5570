//! Exact data-parallel semantics: 2 ranks × batch b over the real TCP ring follow the same
//! trajectory as 1 rank × batch 2b (dropout off, same seed, same examples per step); and the
//! GPU's update path (flat device tensors, tensor-op AdamW, tensor all-reduce) does exactly
//! what the CPU's host path does.

use std::net::TcpListener;
use std::time::Duration;

use candle_core::Device;
use tandem::bench::synthetic_batch;
use tandem::comm::ring::{Ring, RingConfig};
use tandem::comm::Local;
use tandem::data::batch::PretrainBatch;
use tandem::model::{BertConfig, PretrainModel};
use tandem::train::checkpoint::{checkpoint_files, restore, TrainerState};
use tandem::train::step::DEFAULT_BUCKET_ELEMS;
use tandem::train::{AdamWConfig, Decay, Schedule, StepOptions, Trainer, UpdatePlace};

const STEPS: usize = 5;

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
    }
}

fn global_batches() -> Vec<PretrainBatch> {
    // Uneven MLM counts between the halves, so normalising per rank would give a different
    // answer than normalising by the global count.
    (0..STEPS)
        .map(|s| synthetic_batch(&cfg(), 6, 16, 50 + s as u64))
        .collect()
}

/// `batches` split in halves over two ranks joined by a real ring, each updating at
/// `place`: every rank's losses and final parameters.
fn two_ranks(batches: &[PretrainBatch], place: UpdatePlace) -> Vec<(Vec<f32>, Vec<f32>)> {
    two_ranks_run(batches, place, false, 1.0)
        .into_iter()
        .map(|r| (r.losses, r.params))
        .collect()
}

/// How one rank of [`two_ranks_run`] ended.
struct RankEnd {
    losses: Vec<f32>,
    params: Vec<f32>,
    /// AdamW's first moment before and after `gather_state`.
    m_before: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// [`two_ranks`], with the optimiser step `sharded` or not and clipping at `max_grad_norm`.
fn two_ranks_run(
    batches: &[PretrainBatch],
    place: UpdatePlace,
    sharded: bool,
    max_grad_norm: f32,
) -> Vec<RankEnd> {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            let batches = batches.to_vec();
            std::thread::spawn(move || {
                let mut rc = RingConfig::new(rank, 2, peers, "equivalence", 1);
                rc.timeout = Duration::from_secs(20);
                let mut ring = Ring::connect(rc, l).unwrap();
                // Small buckets: the gradient crosses the ring in many pieces.
                let mut o = options(1000);
                o.max_grad_norm = max_grad_norm;
                let mut t = Trainer::with_update_place(
                    PretrainModel::new(&cfg(), 3, &Device::Cpu).unwrap(),
                    o,
                    place,
                )
                .unwrap();
                t.set_sharded(sharded);
                t.broadcast_params(&mut ring, 0).unwrap();
                let losses: Vec<f32> = batches
                    .iter()
                    .map(|b| {
                        let half = b.batch / 2;
                        let mine = if rank == 0 {
                            b.rows(0..half)
                        } else {
                            b.rows(half..b.batch)
                        };
                        t.train_step(&[mine], &mut ring).unwrap().loss
                    })
                    .collect();
                let m_before = t.adamw().unwrap().m.clone();
                t.gather_state(&mut ring).unwrap();
                let opt = t.adamw().unwrap();
                RankEnd {
                    m_before,
                    losses,
                    params: t.model.store.to_flat().unwrap(),
                    m: opt.m.clone(),
                    v: opt.v.clone(),
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The sharded optimiser step (ZeRO stage 1: reduce-scatter, each rank's own part clipped
/// and updated, all-gather): with clipping off, bit for bit the unsharded run — weights and,
/// once gathered, both AdamW moments, on both ranks; with clipping on every step, within
/// float rounding of it (the clipping norm's partial sums are added in another order) and
/// still bit-identical between the ranks.
#[test]
fn a_sharded_optimiser_step_matches_the_unsharded_one() {
    let batches = global_batches();
    for max_norm in [0.0, 0.05] {
        let plain = two_ranks_run(&batches, UpdatePlace::Host, false, max_norm);
        let sharded = two_ranks_run(&batches, UpdatePlace::Host, true, max_norm);
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
        if max_norm == 0.0 {
            assert_same(&a.params, &b.params, "sharded vs unsharded weights");
            assert_same(&a.m, &b.m, "sharded vs unsharded first moments");
            assert_same(&a.v, &b.v, "sharded vs unsharded second moments");
            assert_eq!(a.losses, b.losses);
        } else {
            let worst = a
                .params
                .iter()
                .zip(&b.params)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "clipped: weights differ by {worst}");
            assert!(a.params != plain_start(), "the run trained");
        }
    }
}

/// The weights every run starts from.
fn plain_start() -> Vec<f32> {
    PretrainModel::new(&cfg(), 3, &Device::Cpu)
        .unwrap()
        .store
        .to_flat()
        .unwrap()
}

#[test]
fn two_ranks_with_batch_b_equal_one_rank_with_batch_2b() {
    let batches = global_batches();
    let mut single = Trainer::new(
        PretrainModel::new(&cfg(), 3, &Device::Cpu).unwrap(),
        options(DEFAULT_BUCKET_ELEMS),
    )
    .unwrap();
    let single_losses: Vec<f32> = batches
        .iter()
        .map(|b| {
            single
                .train_step(std::slice::from_ref(b), &mut Local)
                .unwrap()
                .loss
        })
        .collect();
    let single_params = single.model.store.to_flat().unwrap();

    let results = two_ranks(&batches, UpdatePlace::Host);
    for (rank, (losses, _)) in results.iter().enumerate() {
        for (s, (a, b)) in losses.iter().zip(&single_losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "rank {rank} step {s}: loss {a} vs single {b}"
            );
        }
    }
    assert_eq!(
        results[0].1, results[1].1,
        "replicas must stay bit-identical"
    );
    let worst = results[0]
        .1
        .iter()
        .zip(&single_params)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "2 ranks vs 1 rank: parameters differ by {worst}"
    );
}

/// One rank updating at `place` for `steps` of `batches`, clipping at `max_grad_norm`.
fn one_rank(batches: &[PretrainBatch], place: UpdatePlace, max_grad_norm: f32) -> Trainer {
    let mut o = options(1000);
    o.max_grad_norm = max_grad_norm;
    let mut t = Trainer::with_update_place(
        PretrainModel::new(&cfg(), 3, &Device::Cpu).unwrap(),
        o,
        place,
    )
    .unwrap();
    for b in batches {
        t.train_step(std::slice::from_ref(b), &mut Local).unwrap();
    }
    t
}

#[test]
fn the_device_update_path_matches_the_host_path_bit_for_bit() {
    let batches = global_batches();
    // Clipping off, and clipping on every step (the gradient norm is well above 0.05).
    for max_norm in [0.0, 0.05] {
        let host = one_rank(&batches, UpdatePlace::Host, max_norm);
        let dev = one_rank(&batches, UpdatePlace::Device, max_norm);
        assert_eq!(host.update_place(), UpdatePlace::Host);
        assert_eq!(dev.update_place(), UpdatePlace::Device);
        let what = format!("after {STEPS} steps, max_grad_norm {max_norm}");
        assert_same(
            &host.model.store.to_flat().unwrap(),
            &dev.model.store.to_flat().unwrap(),
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
    // The clipped run really clipped (so the comparison above covered clipping).
    let mut t = one_rank(&batches[..1], UpdatePlace::Device, 0.05);
    let s = t
        .train_step(std::slice::from_ref(&batches[1]), &mut Local)
        .unwrap();
    assert!(s.grad_norm > 0.05, "norm {}", s.grad_norm);

    // Two ranks over the ring, gradients all-reduced as tensors: the same as the host path.
    let host = two_ranks(&batches, UpdatePlace::Host);
    let dev = two_ranks(&batches, UpdatePlace::Device);
    for (rank, (h, d)) in host.iter().zip(&dev).enumerate() {
        assert_eq!(h.0, d.0, "rank {rank}: losses");
        assert_same(&h.1, &d.1, &format!("rank {rank}: weights over the ring"));
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
    let batches = global_batches();
    let (head, rest) = batches.split_at(3);
    let reference = one_rank(&batches, UpdatePlace::Host, 1.0);
    for (from, to) in [
        (UpdatePlace::Device, UpdatePlace::Host),
        (UpdatePlace::Host, UpdatePlace::Device),
    ] {
        let first = one_rank(head, from, 1.0);
        let mut state = TrainerState::start(0, "pretrain", 1, 1);
        state.step = 3;
        state.total_steps = 10;
        let files = checkpoint_files(&first, &state).unwrap();
        let files = files.into_iter().collect();
        let mut o = options(1000);
        o.max_grad_norm = 1.0;
        // Different initial weights: everything must come from the checkpoint.
        let mut t = Trainer::with_update_place(
            PretrainModel::new(&cfg(), 77, &Device::Cpu).unwrap(),
            o,
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
