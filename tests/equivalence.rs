//! Exact data-parallel semantics: 2 ranks × batch b over the real TCP ring follow the same
//! trajectory as 1 rank × batch 2b (dropout off, same seed, same examples per step).

use std::net::TcpListener;
use std::time::Duration;

use candle_core::Device;
use tandem::bench::synthetic_batch;
use tandem::comm::ring::{Ring, RingConfig};
use tandem::comm::Local;
use tandem::data::batch::PretrainBatch;
use tandem::model::{BertConfig, PretrainModel};
use tandem::train::step::DEFAULT_BUCKET_ELEMS;
use tandem::train::{AdamWConfig, Decay, Schedule, StepOptions, Trainer};

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

    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            let batches = batches.clone();
            std::thread::spawn(move || {
                let mut rc = RingConfig::new(rank, 2, peers, "equivalence", 1);
                rc.timeout = Duration::from_secs(20);
                let mut ring = Ring::connect(rc, l).unwrap();
                // Small buckets: the gradient crosses the ring in many pieces.
                let mut t = Trainer::new(
                    PretrainModel::new(&cfg(), 3, &Device::Cpu).unwrap(),
                    options(1000),
                )
                .unwrap();
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
                (losses, t.model.store.to_flat().unwrap())
            })
        })
        .collect();
    let results: Vec<(Vec<f32>, Vec<f32>)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();

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
