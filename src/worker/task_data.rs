//! A fine-tuning stage's data: the train and dev files the coordinator announced, read and
//! featurised for the stage's head, batched for training and scored for evaluation.

use anyhow::Context;

use crate::config::StageKind;
use crate::data::batch::{FinetuneBatch, TaskLabels};
use crate::data::finetune::{
    collate_classification, collate_qa, collate_tokens, ClassificationFeature, ClassificationSet,
    LabelMap, Padding, QaExample, QaFeature, QaOptions, QaSet, TokenFeature, TokenSet,
};
use crate::data::tokenizer::Tokenizer;
use crate::metrics::{postprocess_qa, MetricCounts, MetricKind, QaPostprocess};
use crate::model::{TaskHead, TaskModel};
use crate::proto;

/// Where the stage's `role` file goes in the scratch dir: its announced name must be a plain
/// file name (it comes over the wire), or it could write outside `dir`.
fn scratch_path(
    dir: &std::path::Path,
    role: &str,
    name: &str,
) -> anyhow::Result<std::path::PathBuf> {
    anyhow::ensure!(
        crate::util::plain_file_name(name),
        "the assignment's {role} file is named {name:?}: expected a plain file name"
    );
    Ok(dir.join(format!("{role}-{name}")))
}

/// A stage's featurised data.
pub(super) enum TaskData {
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
    pub(super) fn load(
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
            let p = scratch_path(dir, role, &f.name)?;
            let data = fetch(role)?;
            anyhow::ensure!(
                crate::train::checkpoint::sha256_hex(&data) == f.sha256,
                "the {role} file {} differs from the one the coordinator announced",
                f.name
            );
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

    pub(super) fn head(&self) -> TaskHead {
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

    pub(super) fn label_names(&self) -> Vec<String> {
        match self {
            TaskData::Classes { labels, .. } | TaskData::Tokens { labels, .. } => {
                labels.names().to_vec()
            }
            TaskData::Qa { .. } => vec![],
        }
    }

    pub(super) fn n_train(&self) -> usize {
        match self {
            TaskData::Classes { train, .. } => train.len(),
            TaskData::Tokens { train, .. } => train.len(),
            TaskData::Qa { train, .. } => train.len(),
        }
    }

    pub(super) fn batch(&self, idx: &[usize], pad: u32) -> anyhow::Result<FinetuneBatch> {
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
    pub(super) fn evaluate(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_file_names_stay_in_the_scratch_dir() {
        let dir = std::path::Path::new("/scratch");
        assert_eq!(
            scratch_path(dir, "train", "sst2.tsv").unwrap(),
            dir.join("train-sst2.tsv")
        );
        for bad in ["../../home/u/.bashrc", "a/b.tsv", "/etc/passwd", ""] {
            let e = scratch_path(dir, "dev", bad).unwrap_err().to_string();
            assert!(
                e.contains("dev file") && e.contains("plain file name"),
                "{e}"
            );
        }
    }
}
