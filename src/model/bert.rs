//! BERT (Devlin et al. 2019) as HF `BertModel` / `BertForPreTraining`, trainable on candle.
//!
//! Follows transformers' `models/bert/modeling_bert.py`: token + segment + position
//! embeddings, LayerNorm, dropout; post-LN encoder layers; pooler on `[CLS]`; the MLM head
//! (transform + decoder tied to the word embeddings + bias) and the NSP head. Activations are
//! kept 2-D (`[batch·seq, hidden]`) between layers so every projection is one gemm. The MLM
//! decoder runs only at labelled positions (as google-research/bert's `gather_indexes`):
//! same loss and gradients as HF's decoder over every position, far fewer FLOPs.

use super::dropout::{DropoutStream, Multipliers};
use candle_core::{DType, Device, Tensor};

use super::kernels::attention::{attention, Heads};
use super::kernels::linear::{linear, Act};
use super::kernels::norm::{add_layer_norm, layer_norm};
use super::kernels::ops::{self, zero_in_graph};
use super::params::{Init, ParamSpec, ParamStore};
use crate::data::batch::{PretrainBatch, IGNORE};
use crate::error::{Error, Result};
use crate::model::BertConfig;

/// Additive attention bias for padding keys. exp() of it is exactly 0 in f32.
const MASKED: f32 = -1e9;

/// Dropout randomness for one forward pass; `None` means evaluation mode (no dropout).
pub type DropoutRng<'a> = Option<&'a mut DropoutStream>;

/// The parameters of `BertModel` under `prefix` (`"bert."` inside the task models).
pub fn encoder_specs(cfg: &BertConfig, prefix: &str, with_pooler: bool) -> Vec<ParamSpec> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let p = |s: &str| format!("{prefix}{s}");
    let mut v = vec![
        ParamSpec::new(
            p("embeddings.word_embeddings.weight"),
            &[cfg.vocab_size, h],
            Init::NormalPadRow(cfg.pad_token_id),
        ),
        ParamSpec::new(
            p("embeddings.position_embeddings.weight"),
            &[cfg.max_position_embeddings, h],
            Init::Normal,
        ),
        ParamSpec::new(
            p("embeddings.token_type_embeddings.weight"),
            &[cfg.type_vocab_size, h],
            Init::Normal,
        ),
    ];
    v.extend(layer_norm_specs(&p("embeddings.LayerNorm"), h));
    for l in 0..cfg.num_hidden_layers {
        let lp = |s: &str| p(&format!("encoder.layer.{l}.{s}"));
        for n in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            v.extend(linear_specs(&lp(n), h, h));
        }
        v.extend(layer_norm_specs(&lp("attention.output.LayerNorm"), h));
        v.extend(linear_specs(&lp("intermediate.dense"), h, i));
        v.extend(linear_specs(&lp("output.dense"), i, h));
        v.extend(layer_norm_specs(&lp("output.LayerNorm"), h));
    }
    if with_pooler {
        v.extend(linear_specs(&p("pooler.dense"), h, h));
    }
    v
}

/// `BertForPreTraining`'s parameters: the encoder with pooler plus the `cls.*` heads.
pub fn pretraining_specs(cfg: &BertConfig) -> Vec<ParamSpec> {
    let h = cfg.hidden_size;
    let mut v = encoder_specs(cfg, "bert.", true);
    v.extend(linear_specs("cls.predictions.transform.dense", h, h));
    v.extend(layer_norm_specs("cls.predictions.transform.LayerNorm", h));
    v.push(ParamSpec::new(
        "cls.predictions.bias",
        &[cfg.vocab_size],
        Init::Zeros,
    ));
    v.extend(linear_specs("cls.seq_relationship", h, 2));
    v
}

/// The `weight` and `bias` of an `nn.Linear` named `name`.
pub(crate) fn linear_specs(name: &str, fan_in: usize, fan_out: usize) -> [ParamSpec; 2] {
    [
        ParamSpec::new(format!("{name}.weight"), &[fan_out, fan_in], Init::Normal),
        ParamSpec::new(format!("{name}.bias"), &[fan_out], Init::Zeros),
    ]
}

fn layer_norm_specs(name: &str, h: usize) -> [ParamSpec; 2] {
    [
        ParamSpec::new(format!("{name}.weight"), &[h], Init::Ones),
        ParamSpec::new(format!("{name}.bias"), &[h], Init::Zeros),
    ]
}

/// `y = x Wᵀ + b` (PyTorch `nn.Linear` layout: weight is `[out, in]`).
#[derive(Clone)]
pub struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    pub(crate) fn load(store: &ParamStore, name: &str) -> Result<Self> {
        Ok(Linear {
            w: store.get(&format!("{name}.weight"))?,
            b: store.get(&format!("{name}.bias"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(linear(x, &self.w, &self.b, Act::Identity)?)
    }

    /// `gelu(x Wᵀ + b)`, bias and activation fused.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(linear(x, &self.w, &self.b, Act::Gelu)?)
    }

    /// One projection computing several side by side: weights and biases concatenated.
    fn packed(parts: &[&Linear]) -> Result<Linear> {
        let ws: Vec<&Tensor> = parts.iter().map(|l| &l.w).collect();
        let bs: Vec<&Tensor> = parts.iter().map(|l| &l.b).collect();
        Ok(Linear {
            w: Tensor::cat(&ws, 0)?,
            b: Tensor::cat(&bs, 0)?,
        })
    }
}

#[derive(Clone)]
struct LayerNorm {
    g: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(store: &ParamStore, name: &str, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            g: store.get(&format!("{name}.weight"))?,
            b: store.get(&format!("{name}.bias"))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(x, &self.g, &self.b, self.eps)?)
    }

    /// `LayerNorm(dropout(y) + residual)`, in one pass.
    fn forward_residual(
        &self,
        y: &Tensor,
        residual: &Tensor,
        p: f32,
        rng: &mut DropoutRng,
    ) -> Result<Tensor> {
        let keep = dropout_mask(p, rng);
        Ok(add_layer_norm(
            y, residual, &self.g, &self.b, self.eps, keep,
        )?)
    }
}

/// The next dropout site's mask (each 0 with probability `p`, else `1/(1-p)`): `None` in
/// evaluation mode or when `p` is 0.
pub(crate) fn dropout_mask(p: f32, rng: &mut DropoutRng) -> Option<Multipliers> {
    rng.as_deref_mut()?.next(p).map(Multipliers::Mask)
}

/// Inverted dropout with a seeded mask, made on `x`'s device (candle's own dropout cannot be
/// seeded).
pub(crate) fn dropout(x: &Tensor, p: f32, rng: &mut DropoutRng) -> Result<Tensor> {
    match dropout_mask(p, rng) {
        None => Ok(x.clone()),
        Some(mask) => {
            // In f32 (1/(1-p) is not exact in bf16), back to the input's dtype.
            let mask = mask.tensor(x.shape(), x.device())?;
            Ok(x.to_dtype(DType::F32)?.mul(&mask)?.to_dtype(x.dtype())?)
        }
    }
}

/// A batch moved to the device: ids, segment ids, positions and the attention bias.
pub struct Inputs {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence (padded).
    pub seq: usize,
    /// The token ids on the host (to find padding tokens).
    ids_host: Vec<u32>,
    input_ids: Tensor,
    token_type_ids: Tensor,
    position_ids: Tensor,
    attention_bias: Tensor,
}

impl Inputs {
    pub(crate) fn new(b: &PretrainBatch, device: &Device) -> Result<Self> {
        Self::from_arrays(
            b.batch,
            b.seq,
            &b.input_ids,
            &b.token_type_ids,
            &b.attention_mask,
            device,
        )
    }

    /// From `batch × seq` row-major ids, segment ids and attention mask (1 = attend).
    pub fn from_arrays(
        batch: usize,
        seq: usize,
        input_ids: &[u32],
        token_type_ids: &[u32],
        attention_mask: &[u32],
        device: &Device,
    ) -> Result<Self> {
        let n = batch * seq;
        if input_ids.len() != n || token_type_ids.len() != n || attention_mask.len() != n {
            return Err(Error::Batch(format!(
                "arrays must hold batch × seq = {n} entries"
            )));
        }
        let positions: Vec<u32> = (0..n).map(|i| (i % seq) as u32).collect();

        let bias: Vec<f32> = attention_mask
            .iter()
            .map(|&m| if m == 0 { MASKED } else { 0.0 })
            .collect();
        Ok(Inputs {
            batch,
            seq,
            ids_host: input_ids.to_vec(),
            input_ids: Tensor::from_slice(input_ids, n, device)?,
            token_type_ids: Tensor::from_slice(token_type_ids, n, device)?,
            position_ids: Tensor::from_vec(positions, n, device)?,
            attention_bias: Tensor::from_vec(bias, (batch, seq), device)?,
        })
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
}

/// HF `BertModel`: embeddings, encoder and (optionally) the pooler.
pub struct BertModel {
    cfg: BertConfig,
    word: Tensor,
    pos: Tensor,
    types: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    /// The activations' dtype after the embeddings (see [`Precision`]).
    compute: DType,
}

/// Compute precision (`model.precision`). `bf16` is mixed precision: matmuls and activations
/// in bf16, LayerNorm statistics, softmax and the losses in f32; the parameters stay f32
/// master weights (cast in the graph, so gradients, the all-reduce and AdamW are f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: bf16 matmuls and activations, f32 statistics, losses and weights.
    Bf16,
}

impl Precision {
    pub(crate) fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?}: expected f32 or bf16")),
        }
    }
}

impl BertModel {
    pub(crate) fn load(
        store: &ParamStore,
        cfg: &BertConfig,
        prefix: &str,
        with_pooler: bool,
    ) -> Result<Self> {
        let p = |s: &str| format!("{prefix}{s}");
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let lp = |s: &str| p(&format!("encoder.layer.{l}.{s}"));
                Ok(Layer {
                    q: Linear::load(store, &lp("attention.self.query"))?,
                    k: Linear::load(store, &lp("attention.self.key"))?,
                    v: Linear::load(store, &lp("attention.self.value"))?,
                    attn_out: Linear::load(store, &lp("attention.output.dense"))?,
                    attn_ln: LayerNorm::load(store, &lp("attention.output.LayerNorm"), eps)?,
                    inter: Linear::load(store, &lp("intermediate.dense"))?,
                    out: Linear::load(store, &lp("output.dense"))?,
                    out_ln: LayerNorm::load(store, &lp("output.LayerNorm"), eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BertModel {
            cfg: cfg.clone(),
            word: store.get(&p("embeddings.word_embeddings.weight"))?,
            pos: store.get(&p("embeddings.position_embeddings.weight"))?,
            types: store.get(&p("embeddings.token_type_embeddings.weight"))?,
            emb_ln: LayerNorm::load(store, &p("embeddings.LayerNorm"), eps)?,
            layers,
            pooler: if with_pooler {
                Some(Linear::load(store, &p("pooler.dense"))?)
            } else {
                None
            },
            compute: DType::F32,
        })
    }

    /// Runs the encoder in `p` from now on (the parameters are untouched).
    pub fn set_precision(&mut self, p: Precision) {
        self.compute = p.dtype();
    }

    pub(crate) fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub(crate) fn word_embeddings(&self) -> &Tensor {
        &self.word
    }

    /// The last hidden states, `[batch·seq, hidden]`.
    pub fn forward(&self, x: &Inputs, rng: &mut DropoutRng) -> Result<Tensor> {
        let cfg = &self.cfg;
        let p_hidden = cfg.hidden_dropout_prob;
        let e = self
            .word_lookup(x)?
            .add(&self.pos.index_select(&x.position_ids, 0)?)?
            .add(&self.types.index_select(&x.token_type_ids, 0)?)?;
        let mut h = dropout(&self.emb_ln.forward(&e)?, p_hidden, rng)?.to_dtype(self.compute)?;
        let (b, t, nh, dh) = (x.batch, x.seq, cfg.num_attention_heads, cfg.head_dim());
        let scale = 1.0 / (dh as f64).sqrt();
        let shape = Heads {
            batch: b,
            seq: t,
            heads: nh,
            head_dim: dh,
        };
        for layer in &self.layers {
            // Q, K and V in one gemm: [b·t, 3·hidden].
            let qkv = Linear::packed(&[&layer.q, &layer.k, &layer.v])?.forward(&h)?;
            let keep = dropout_mask(cfg.attention_probs_dropout_prob, rng);
            let ctx = attention(&qkv, &x.attention_bias, shape, scale, keep)?;
            let a = layer.attn_ln.forward_residual(
                &layer.attn_out.forward(&ctx)?,
                &h,
                p_hidden,
                rng,
            )?;
            let f = layer.out.forward(&layer.inter.forward_gelu(&a)?)?;
            h = layer.out_ln.forward_residual(&f, &a, p_hidden, rng)?;
        }
        Ok(h)
    }

    /// Word embeddings of the inputs. As PyTorch's `nn.Embedding(padding_idx=…)`, the lookup
    /// of the padding token passes no gradient to its row (the row still gets the tied
    /// decoder's gradient, as in HF); the forward value is unchanged.
    fn word_lookup(&self, x: &Inputs) -> Result<Tensor> {
        let pad = self.cfg.pad_token_id as u32;
        let e = self.word.index_select(&x.input_ids, 0)?;
        if !x.ids_host.contains(&pad) {
            return Ok(e);
        }
        let keep: Vec<f32> = x
            .ids_host
            .iter()
            .map(|id| if *id == pad { 0.0 } else { 1.0 })
            .collect();
        let keep = Tensor::from_vec(keep, (x.ids_host.len(), 1), e.device())?;
        let frozen = self.word.detach().index_select(&x.input_ids, 0)?;
        Ok((e.broadcast_mul(&keep)? + frozen.broadcast_mul(&keep.affine(-1.0, 1.0)?)?)?)
    }

    /// `tanh(W h[CLS] + b)`, `[batch, hidden]`.
    pub fn pool(&self, hidden: &Tensor, x: &Inputs) -> Result<Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .ok_or_else(|| Error::Train("this model has no pooler".into()))?;
        // Contiguous: the row view is strided (`[seq·hidden, 1]`), which CUDA's matmul refuses.
        let cls = hidden
            .reshape((x.batch, x.seq, self.cfg.hidden_size))?
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .contiguous()?;
        Ok(pooler.forward(&cls)?.tanh()?)
    }
}

/// HF `BertForPreTraining`: the encoder plus the MLM and NSP heads.
pub struct BertForPreTraining {
    /// The encoder, with its pooler.
    pub bert: BertModel,
    transform: Linear,
    transform_ln: LayerNorm,
    decoder_bias: Tensor,
    nsp: Linear,
}

/// Loss sums and counts of one forward pass (not means: the caller divides by global counts).
pub struct PretrainOutput {
    /// Σ cross-entropy over MLM-labelled positions (scalar tensor, in the graph).
    pub mlm_sum: Tensor,
    /// MLM-labelled positions.
    pub mlm_count: usize,
    /// MLM-labelled positions whose argmax is the label.
    pub mlm_correct: usize,
    /// Σ cross-entropy over NSP-labelled examples.
    pub nsp_sum: Tensor,
    /// NSP-labelled examples.
    pub nsp_count: usize,
    /// NSP-labelled examples whose argmax is the label.
    pub nsp_correct: usize,
    /// `[batch, 2]` NSP logits.
    pub nsp_logits: Tensor,
}

impl BertForPreTraining {
    pub(crate) fn load(store: &ParamStore, cfg: &BertConfig) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        Ok(BertForPreTraining {
            bert: BertModel::load(store, cfg, "bert.", true)?,
            transform: Linear::load(store, "cls.predictions.transform.dense")?,
            transform_ln: LayerNorm::load(store, "cls.predictions.transform.LayerNorm", eps)?,
            decoder_bias: store.get("cls.predictions.bias")?,
            nsp: Linear::load(store, "cls.seq_relationship")?,
        })
    }

    /// MLM logits for the given rows of the hidden states: `[rows, vocab]`.
    fn mlm_logits(&self, rows: &Tensor) -> Result<Tensor> {
        let t = self
            .transform_ln
            .forward(&self.transform.forward_gelu(rows)?)?;
        let logits = linear(
            &t,
            self.bert.word_embeddings(),
            &self.decoder_bias,
            Act::Identity,
        )?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// `[batch, 2]` NSP logits (f32) from the hidden states.
    fn nsp_logits(&self, h: &Tensor, x: &Inputs) -> Result<Tensor> {
        Ok(self
            .nsp
            .forward(&self.bert.pool(h, x)?)?
            .to_dtype(DType::F32)?)
    }

    /// MLM logits at every position, `[batch, seq, vocab]` (HF's `prediction_logits`), and
    /// NSP logits `[batch, 2]`. For inspection; training uses [`Self::forward`].
    pub fn logits(&self, b: &PretrainBatch) -> Result<(Tensor, Tensor)> {
        let x = Inputs::new(b, self.bert.word.device())?;
        let h = self.bert.forward(&x, &mut None)?;
        let mlm = self.mlm_logits(&h)?.reshape((b.batch, b.seq, ()))?;
        let nsp = self.nsp_logits(&h, &x)?;
        Ok((mlm, nsp))
    }

    /// Forward pass with both losses as sums plus counts. `rng = None` is evaluation mode.
    pub fn forward(&self, b: &PretrainBatch, rng: &mut DropoutRng) -> Result<PretrainOutput> {
        b.validate(self.bert.config())?;
        let dev = self.bert.word.device();
        let x = Inputs::new(b, dev)?;
        let h = self.bert.forward(&x, rng)?;

        let (rows, labels): (Vec<u32>, Vec<u32>) = b
            .mlm_labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l != IGNORE)
            .map(|(i, l)| (i as u32, *l as u32))
            .unzip();
        let (mlm_sum, mlm_correct) = if rows.is_empty() {
            // No labelled position: a zero that still reaches the MLM head's parameters, so
            // every tensor gets a gradient (zero) and the buckets keep their layout.
            let probe = self.mlm_logits(&h.narrow(0, 0, 1)?)?;
            (zero_in_graph(&probe)?, 0)
        } else {
            let sel = h.index_select(&Tensor::from_slice(&rows, rows.len(), dev)?, 0)?;
            let logits = self.mlm_logits(&sel)?;
            let correct = count_correct(&logits, &labels)?;
            (ops::cross_entropy_sum(&logits, &labels)?, correct)
        };

        let nsp_logits = self.nsp_logits(&h, &x)?;
        let (nsp_sum, nsp_correct) = if b.nsp_labels.is_empty() {
            (zero_in_graph(&nsp_logits)?, 0)
        } else {
            let c = count_correct(&nsp_logits, &b.nsp_labels)?;
            (ops::cross_entropy_sum(&nsp_logits, &b.nsp_labels)?, c)
        };
        Ok(PretrainOutput {
            mlm_sum,
            mlm_count: rows.len(),
            mlm_correct,
            nsp_sum,
            nsp_count: b.nsp_labels.len(),
            nsp_correct,
            nsp_logits,
        })
    }
}

fn count_correct(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count())
}
