//! Preparing a job before any worker is admitted: the shard index, the tokenizer and the model
//! config (all kept in `state_dir`), and each fine-tuning stage's datasets and `init_from`.

use anyhow::Context;

use super::state::{Prepared, StageInputs};
use super::store::CheckpointStore;
use crate::config::JobConfig;
use crate::data::corpus::{resolve_inputs, CorpusOptions, ErrorPolicy};
use crate::data::shard::{build_index, ShardIndex};
use crate::data::tokenizer::{train_wordpiece, Tokenizer};
use crate::model::{BertConfig, Preset};
use crate::proto;
use std::time::Instant;

fn corpus_options(cfg: &JobConfig) -> CorpusOptions {
    CorpusOptions {
        max_line_bytes: cfg.data.max_line_bytes,
        on_error: if cfg.data.on_error == "skip" {
            ErrorPolicy::Skip
        } else {
            ErrorPolicy::Fail
        },
    }
}

/// Builds (or re-uses) the shard index, the tokenizer and the model config under `state_dir`.
pub fn prepare(cfg: &JobConfig) -> anyhow::Result<Prepared> {
    let state_dir = &cfg.job.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state_dir {}", state_dir.display()))?;
    let opts = corpus_options(cfg);
    if !cfg.pretrains() {
        return prepare_finetuning(cfg, opts);
    }
    let files = resolve_inputs(&cfg.data.corpus)?;
    let index_path = state_dir.join("shards.json");
    let index = match ShardIndex::load(&index_path) {
        Ok(ix)
            if ix.options == opts
                && ix.same_inputs(&files, cfg.shard_bytes())
                && ix.verify_unchanged().is_ok() =>
        {
            tracing::info!(
                shards = ix.shards.len(),
                "re-using the shard index in {}",
                index_path.display()
            );
            ix
        }
        _ => {
            let t0 = Instant::now();
            let ix = build_index(&files, cfg.shard_bytes(), &opts)?;
            ix.save(&index_path)?;
            tracing::info!(
                shards = ix.shards.len(),
                documents = ix.total_documents(),
                secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
                "built the shard index"
            );
            ix
        }
    };
    let tok_dir = state_dir.join("tokenizer");
    let tokenizer = match &cfg.data.tokenizer {
        Some(p) => {
            let tok = Tokenizer::load(p)?;
            tracing::info!(
                vocab = tok.vocab_size(),
                "using data.tokenizer {}",
                p.display()
            );
            tok
        }
        None if tok_dir.join("tokenizer.json").exists() => Tokenizer::load(&tok_dir)?,
        None => {
            tracing::info!(
                vocab_size = cfg.data.vocab_size,
                "training a WordPiece vocabulary on the corpus"
            );
            let t0 = Instant::now();
            let tok = train_wordpiece(&files, cfg.data.vocab_size, cfg.data.lowercase, None, 2)?;
            tok.save(&tok_dir)?;
            tracing::info!(
                vocab = tok.vocab_size(),
                secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
                "tokenizer saved to {}",
                tok_dir.display()
            );
            tok
        }
    };
    let mut model_cfg = match (&cfg.model.preset, &cfg.model.config) {
        (Some(p), _) => BertConfig::preset(*p),
        (None, Some(path)) => BertConfig::load(path)?,
        (None, None) => BertConfig::preset(Preset::Tiny),
    };
    model_cfg.vocab_size = tokenizer.vocab_size();
    model_cfg.pad_token_id = tokenizer.pad_id() as usize;
    if let Some(p) = cfg.model.dropout {
        model_cfg.hidden_dropout_prob = p;
        model_cfg.attention_probs_dropout_prob = p;
    }
    if let Some(m) = cfg.model.max_position_embeddings {
        model_cfg.max_position_embeddings = m;
    }
    let seq = cfg.data.instances.max_seq_length;
    anyhow::ensure!(
        seq <= model_cfg.max_position_embeddings,
        "data.instances.max_seq_length {seq} exceeds the model's max_position_embeddings {}",
        model_cfg.max_position_embeddings
    );
    model_cfg.validate()?;
    tokenizer.warn_beyond_max_length(seq, "data.instances.max_seq_length");
    let stages = all_stage_inputs(cfg)?;
    check_previous_positions(cfg, &stages, Some((&model_cfg, &tokenizer)))?;
    Ok(Prepared {
        index_json: serde_json::to_string(&index)?,
        index,
        tokenizer_json: tokenizer.to_json()?,
        model_cfg_json: serde_json::to_string(&model_cfg)?,
        model_cfg,
        stages,
    })
}

/// A job whose stages all fine-tune: no corpus is scanned; the model shape comes from the
/// first stage's `init_from`, and so does the tokenizer unless `data.tokenizer` names one.
fn prepare_finetuning(cfg: &JobConfig, opts: CorpusOptions) -> anyhow::Result<Prepared> {
    let stages = all_stage_inputs(cfg)?;
    let init = cfg.stages[0].init_from.as_deref().expect("validated");
    let model_cfg: BertConfig = serde_json::from_str(
        stages[0]
            .model_cfg_json
            .as_deref()
            .expect("the first stage imports its init_from"),
    )?;
    check_model_section(cfg, &model_cfg, init)?;
    check_previous_positions(cfg, &stages, None)?;
    // The stage trains with its checkpoint's own tokenizer when it has one (as any stage
    // does), so a different data.tokenizer would be ignored: refuse it instead.
    let tokenizer_json = match (&cfg.data.tokenizer, &stages[0].tokenizer_json) {
        (Some(p), Some(own)) => {
            let named = Tokenizer::load(p)?.to_json()?;
            anyhow::ensure!(
                named == *own,
                "data.tokenizer {} differs from the tokenizer of stages[0].init_from {init}, \
                 which the stage trains with; remove data.tokenizer, or the checkpoint's \
                 tokenizer files",
                p.display()
            );
            named
        }
        (Some(p), None) => Tokenizer::load(p)?.to_json()?,
        (None, Some(t)) => t.clone(),
        (None, None) => anyhow::bail!(
            "stages[0].init_from: {init} has neither tokenizer.json nor vocab.txt; set data.tokenizer"
        ),
    };
    let index = ShardIndex::empty(cfg.shard_bytes(), opts);
    Ok(Prepared {
        index_json: serde_json::to_string(&index)?,
        index,
        tokenizer_json,
        model_cfg_json: serde_json::to_string(&model_cfg)?,
        model_cfg,
        stages,
    })
}

/// A `[model]` section in a job that starts from a checkpoint must describe that checkpoint.
fn check_model_section(cfg: &JobConfig, ckpt: &BertConfig, init: &str) -> anyhow::Result<()> {
    let (named, want) = match (&cfg.model.preset, &cfg.model.config) {
        (Some(p), _) => (format!("model.preset = {p:?}"), BertConfig::preset(*p)),
        (None, Some(path)) => (
            format!("model.config = {}", path.display()),
            BertConfig::load(path)?,
        ),
        (None, None) => return Ok(()),
    };
    let shape = |c: &BertConfig| {
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
        )
    };
    anyhow::ensure!(
        shape(&want) == shape(ckpt),
        "{named} (hidden {}, layers {}, heads {}, intermediate {}) disagrees with \
         stages[0].init_from {init} (hidden {}, layers {}, heads {}, intermediate {}); \
         a job that starts from a checkpoint needs no [model] section",
        want.hidden_size,
        want.num_hidden_layers,
        want.num_attention_heads,
        want.intermediate_size,
        ckpt.hidden_size,
        ckpt.num_hidden_layers,
        ckpt.num_attention_heads,
        ckpt.intermediate_size
    );
    Ok(())
}

/// A fine-tuning stage's sequences must fit the positions of the model it starts from.
fn check_positions(i: usize, len: usize, model: &BertConfig, from: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        len <= model.max_position_embeddings,
        "stages[{i}].max_seq_length {len} exceeds the max_position_embeddings {} of {from}",
        model.max_position_embeddings
    );
    Ok(())
}

/// A stage with `init_from = "previous"` starts from the model the stage before it ended
/// with: the pre-trained one, or the checkpoint an earlier stage started from. Its sequences
/// must fit that model's positions (a stage's own `init_from` is checked in `stage_inputs`).
fn check_previous_positions(
    cfg: &JobConfig,
    stages: &[StageInputs],
    pretrained: Option<(&BertConfig, &Tokenizer)>,
) -> anyhow::Result<()> {
    let mut model = pretrained.map(|(m, _)| (m.clone(), "the pre-trained model".to_string()));
    let mut tokenizer = pretrained.map(|(_, t)| t);
    for (i, (s, inputs)) in cfg.stages.iter().zip(stages).enumerate() {
        if let Some(json) = &inputs.model_cfg_json {
            let from = format!(
                "stages[{i}].init_from {}",
                s.init_from.as_deref().unwrap_or("")
            );
            model = Some((serde_json::from_str(json)?, from));
            tokenizer = None; // that checkpoint's own tokenizer was checked with it
        } else if s.kind != crate::config::StageKind::Pretrain {
            if let Some((m, from)) = &model {
                check_positions(i, s.max_seq_length, m, from)?;
            }
            let key = format!("stages[{i}].max_seq_length");
            tokenizer.inspect(|t| t.warn_beyond_max_length(s.max_seq_length, &key));
        }
    }
    Ok(())
}

fn all_stage_inputs(cfg: &JobConfig) -> anyhow::Result<Vec<StageInputs>> {
    (cfg.stages.iter().enumerate())
        .map(|(i, s)| stage_inputs(cfg, i, s))
        .collect()
}

/// Reads a fine-tuning stage's datasets and `init_from` checkpoint (imported into the
/// checkpoint store, so workers fetch it over gRPC like any checkpoint).
fn stage_inputs(
    cfg: &JobConfig,
    i: usize,
    s: &crate::config::StageConfig,
) -> anyhow::Result<StageInputs> {
    use crate::config::StageKind;
    if s.kind == StageKind::Pretrain {
        return Ok(StageInputs::default());
    }
    let mut out = StageInputs::default();
    for (role, path) in [("train", &s.train), ("dev", &s.dev)] {
        let path = path.as_ref().expect("validated");
        let data = std::fs::read(path)
            .with_context(|| format!("stages[{i}].{role}: reading {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| role.into());
        out.files.push(proto::DataFile {
            role: role.into(),
            name,
            sha256: crate::train::checkpoint::sha256_hex(&data),
            size: data.len() as u64,
            data,
        });
    }
    // Check the datasets here, so a bad file fails the job before any worker starts.
    let (train, dev) = (s.train.as_ref().unwrap(), s.dev.as_ref().unwrap());
    match s.kind {
        StageKind::SequenceClassification | StageKind::PairClassification => {
            let t = crate::data::finetune::ClassificationSet::read(train)?;
            let d = crate::data::finetune::ClassificationSet::read(dev)?;
            let labels = t.label_map()?;
            let ids = d.label_ids(&labels)?;
            let mut counts = vec![0usize; labels.len()];
            ids.iter().for_each(|i| counts[*i as usize] += 1);
            out.majority_baseline =
                Some(*counts.iter().max().unwrap_or(&0) as f64 / ids.len().max(1) as f64);
        }
        StageKind::TokenClassification => {
            let t = crate::data::finetune::TokenSet::read(train)?;
            crate::data::finetune::TokenSet::read(dev)?.label_ids(&t.label_map()?)?;
        }
        StageKind::QuestionAnswering => {
            crate::data::finetune::QaSet::read(train)?;
            crate::data::finetune::QaSet::read(dev)?;
        }
        StageKind::Pretrain => unreachable!(),
    }
    if let Some(dir) = s.init_from.as_deref().filter(|d| *d != "previous") {
        let dir = std::path::Path::new(dir);
        let mut files = vec![];
        for f in [
            crate::model::hf::WEIGHTS_FILE,
            crate::model::hf::CONFIG_FILE,
        ] {
            let p = dir.join(f);
            files.push((
                f.to_string(),
                std::fs::read(&p)
                    .with_context(|| format!("stages[{i}].init_from: reading {}", p.display()))?,
            ));
        }
        let mcfg = BertConfig::load(&dir.join(crate::model::hf::CONFIG_FILE))?;
        check_positions(
            i,
            s.max_seq_length,
            &mcfg,
            &format!("init_from {}", dir.display()),
        )?;
        out.model_cfg_json = Some(serde_json::to_string(&mcfg)?);
        if dir.join("tokenizer.json").exists() || dir.join("vocab.txt").exists() {
            let tok = Tokenizer::load(dir)?;
            anyhow::ensure!(
                tok.vocab_size() <= mcfg.vocab_size,
                "stages[{i}].init_from: the tokenizer has {} tokens, the model {}",
                tok.vocab_size(),
                mcfg.vocab_size
            );
            tok.warn_beyond_max_length(s.max_seq_length, &format!("stages[{i}].max_seq_length"));
            out.tokenizer_json = Some(tok.to_json()?);
        }
        let name = format!("stage{i}-init");
        let store =
            CheckpointStore::new(cfg.job.state_dir.join("checkpoints"), cfg.checkpoint.keep)?;
        store.commit(&name, &files)?;
        out.imported = Some(name);
    }
    Ok(out)
}
