//! The composed ops — the path a GPU runs — on this CPU, in f32 and in bf16, for every stage
//! kind: a training step on the device update path (forward and backward, dropout on, the
//! masks made by `Mask::tensor` as on a device) and an evaluation forward pass (what `predict`
//! runs). Every matmul checks candle's CUDA layout rule (`MatMulNonContiguous` otherwise), so a
//! strided operand fails here and not on the first GPU. Its own test binary, hence its own
//! process: the fused kernels are switched off (`TANDEM_FUSED_KERNELS=0`) before any runs.

use candle_core::Device;
use tandem::bench::{synthetic_batch, synthetic_task_batch};
use tandem::comm::Local;
use tandem::data::batch::{FinetuneBatch, TaskLabels};
use tandem::model::{BertConfig, Precision, PretrainModel, TaskHead, TaskModel};
use tandem::train::{AdamWConfig, Decay, Schedule, StageModel, StepOptions, Trainer, UpdatePlace};

fn cfg() -> BertConfig {
    let mut c = BertConfig::new(60, 32, 2, 2, 64);
    c.max_position_embeddings = 32;
    c
}

fn options() -> StepOptions {
    StepOptions {
        adamw: AdamWConfig::default(),
        schedule: Schedule {
            peak_lr: 1e-3,
            warmup_steps: 0,
            total_steps: 10,
            decay: Decay::Linear,
        },
        max_grad_norm: 1.0,
        bucket_elems: 1000,
        seed: 5,
        dropout: true,
        dropout_stream: None,
    }
}

/// One training step of `model` on `batch` on the device update path.
fn step<M: StageModel>(what: &str, model: M, batch: &M::Batch) -> Trainer<M> {
    let mut t = Trainer::with_update_place(model, options(), UpdatePlace::Device).unwrap();
    if let Err(e) = t.train_step(std::slice::from_ref(batch), &mut Local) {
        panic!("{what}: {e}");
    }
    t
}

#[test]
fn every_stage_kind_runs_the_composed_ops_with_layouts_cuda_accepts() {
    // Read once per process, at the first kernel: set before anything runs.
    std::env::set_var("TANDEM_FUSED_KERNELS", "0");
    assert!(!tandem::model::kernels::ops::fused_kernels());
    let heads = [
        (
            "sequence_classification",
            TaskHead::SequenceClassification { num_labels: 3 },
            false,
        ),
        (
            "sentence_pairs",
            TaskHead::SequenceClassification { num_labels: 2 },
            true,
        ),
        (
            "token_classification",
            TaskHead::TokenClassification { num_labels: 5 },
            false,
        ),
        ("question_answering", TaskHead::QuestionAnswering, true),
    ];
    for precision in [Precision::F32, Precision::Bf16] {
        let mut m = PretrainModel::new(&cfg(), 3, &Device::Cpu).unwrap();
        m.set_precision(precision);
        let batch = synthetic_batch(&cfg(), 4, 16, 1);
        let t = step(&format!("pretrain, {precision:?}"), m, &batch);
        if let Err(e) = t.model.model.forward(&batch, &mut None) {
            panic!("pretrain eval, {precision:?}: {e}");
        }
        for (i, (name, head, pair)) in heads.into_iter().enumerate() {
            let what = format!("{name}, {precision:?}");
            let mut m = TaskModel::new(&cfg(), head, 3, &Device::Cpu).unwrap();
            m.set_precision(precision);
            let b = synthetic_task_batch(head, pair, (4, 16), 60, 10 + i as u64);
            let t = step(&what, m, &b);
            // Prediction: evaluation mode, no labels.
            let unlabelled = FinetuneBatch {
                labels: TaskLabels::None,
                ..b
            };
            if let Err(e) = t.model.logits(&unlabelled) {
                panic!("{what}, prediction: {e}");
            }
        }
    }
}
