//! Fused multi-head self-attention: `softmax(Q Kᵀ · scale + mask) V` with attention-probability
//! dropout, from the packed `[Q | K | V]` projection straight to the merged context.
//!
//! The composed version copies Q, K and V into a head-major layout (`transpose().contiguous()`),
//! runs candle's batched matmul (one small gemm per batch·head, each on one thread, one after
//! another), a softmax op, a dropout multiply, and copies the context back. Here every
//! (sequence, head) pair is an independent task on rayon's pool that reads its head through
//! strides, keeps its `seq × seq` scores in cache, and writes its block of the context; the
//! probabilities are kept for the backward pass, which is the same per-task structure.
//! On other devices the function composes the same computation from candle ops.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::gemm::{self, matmul, matmul_raw, SendPtr, View};
use super::ops::{contiguous_f32, is_cpu, with_f32};
use super::vmath;
use crate::model::dropout::Multipliers;

type CResult<T> = candle_core::Result<T>;

/// The shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl Heads {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Head `h` of part `part` (0 = Q, 1 = K, 2 = V) of sequence `b` in the packed
    /// `[b·t, 3·hidden]` projection.
    fn packed(&self, b: usize, h: usize, part: usize) -> View {
        let w = 3 * self.hidden();
        View::block(
            b * self.seq * w + part * self.hidden() + h * self.head_dim,
            self.seq,
            self.head_dim,
            w,
        )
    }

    /// Head `h` of sequence `b` in the merged `[b·t, hidden]` context.
    fn merged(&self, b: usize, h: usize) -> View {
        View::block(
            b * self.seq * self.hidden() + h * self.head_dim,
            self.seq,
            self.head_dim,
            self.hidden(),
        )
    }
}

struct Attention {
    shape: Heads,
    scale: f32,
    /// Additive bias per key, `[batch, seq]` (0 or a large negative number for padding).
    bias: Vec<f32>,
    /// Dropout multipliers for the probabilities (`0` or `1/(1-p)`), `[batch, heads, seq, seq]`.
    keep: Option<Vec<f32>>,
    /// The probabilities before dropout, kept for backward.
    probs: OnceLock<Vec<f32>>,
}

/// `out[i] = p[i] · keep[i]` (or a copy of `p` without dropout).
fn dropped<'a>(p: &'a [f32], keep: Option<&[f32]>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match keep {
        None => p,
        Some(k) => {
            buf.clear();
            buf.extend(p.iter().zip(k).map(|(a, b)| a * b));
            buf
        }
    }
}

impl Attention {
    fn keep_of(&self, task: usize) -> Option<&[f32]> {
        let tt = self.shape.seq * self.shape.seq;
        self.keep.as_deref().map(|k| &k[task * tt..(task + 1) * tt])
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "tandem-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s, l, self.name())?;
        let sh = self.shape;
        let (t, nh, hid) = (sh.seq, sh.heads, sh.hidden());
        if qkv.len() != sh.batch * t * 3 * hid {
            candle_core::bail!(
                "attention: packed input {:?} is not [b·t, 3·hidden]",
                l.dims()
            )
        }
        let mut out = vec![0f32; sh.batch * t * hid];
        let mut probs = vec![0f32; sh.batch * nh * t * t];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let forward_task = |(task, p): (usize, &mut [f32])| {
            let (b, h) = (task / nh, task % nh);
            matmul(
                p,
                View::dense(t, t),
                qkv,
                sh.packed(b, h, 0),
                qkv,
                sh.packed(b, h, 1).t(),
                false,
                false,
            );
            let bias = &self.bias[b * t..(b + 1) * t];
            for row in p.chunks_mut(t) {
                let mut max = f32::NEG_INFINITY;
                for (v, bj) in row.iter_mut().zip(bias) {
                    *v = *v * self.scale + bj;
                    max = max.max(*v);
                }
                let inv = 1.0 / vmath::exp_shifted_sum(row, max);
                row.iter_mut().for_each(|v| *v *= inv);
            }
            let mut buf = Vec::new();
            let pd = dropped(p, self.keep_of(task), &mut buf);
            // SAFETY: each task writes only its own (sequence, head) block of `out`.
            unsafe {
                matmul_raw(
                    out_ptr.get(),
                    sh.merged(b, h),
                    pd,
                    View::dense(t, t),
                    qkv,
                    sh.packed(b, h, 2),
                    false,
                    false,
                )
            };
        };
        if gemm::parallel() {
            probs
                .par_chunks_mut(t * t)
                .enumerate()
                .for_each(forward_task);
        } else {
            probs.chunks_mut(t * t).enumerate().for_each(forward_task);
        }
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), Shape::from((sh.batch * t, hid))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, dctx: &Tensor) -> CResult<Option<Tensor>> {
        let Some(probs) = self.probs.get() else {
            candle_core::bail!("attention backward: the forward pass kept no probabilities")
        };
        let sh = self.shape;
        let (t, nh) = (sh.seq, sh.heads);
        let dqkv = with_f32(qkv, |qkv| {
            with_f32(dctx, |dctx| {
                let mut dqkv = vec![0f32; qkv.len()];
                let ptr = SendPtr(dqkv.as_mut_ptr());
                let backward_task = |task: usize| {
                    let (b, h) = (task / nh, task % nh);
                    let p = &probs[task * t * t..(task + 1) * t * t];
                    let keep = self.keep_of(task);
                    let mut buf = Vec::new();
                    let pd = dropped(p, keep, &mut buf);
                    let ctx_view = sh.merged(b, h);
                    // d(dropped probs) = dctx · Vᵀ
                    let mut ds = vec![0f32; t * t];
                    matmul(
                        &mut ds,
                        View::dense(t, t),
                        dctx,
                        ctx_view,
                        qkv,
                        sh.packed(b, h, 2).t(),
                        false,
                        false,
                    );
                    // SAFETY: each task writes only the Q, K and V blocks of its own
                    // (sequence, head) in `dqkv`; the blocks of different tasks are disjoint.
                    unsafe {
                        // dV = (dropped probs)ᵀ · dctx
                        matmul_raw(
                            ptr.get(),
                            sh.packed(b, h, 2),
                            pd,
                            View::dense(t, t).t(),
                            dctx,
                            ctx_view,
                            false,
                            false,
                        );
                    }
                    // Through dropout and softmax to the scaled scores.
                    for i in 0..t {
                        let row = &mut ds[i * t..(i + 1) * t];
                        let pr = &p[i * t..(i + 1) * t];
                        if let Some(k) = keep {
                            row.iter_mut()
                                .zip(&k[i * t..(i + 1) * t])
                                .for_each(|(d, k)| *d *= k);
                        }
                        let dot: f32 = row.iter().zip(pr).map(|(d, p)| d * p).sum();
                        row.iter_mut()
                            .zip(pr)
                            .for_each(|(d, p)| *d = self.scale * p * (*d - dot));
                    }
                    unsafe {
                        // dQ = dS · K, dK = dSᵀ · Q
                        matmul_raw(
                            ptr.get(),
                            sh.packed(b, h, 0),
                            &ds,
                            View::dense(t, t),
                            qkv,
                            sh.packed(b, h, 1),
                            false,
                            false,
                        );
                        matmul_raw(
                            ptr.get(),
                            sh.packed(b, h, 1),
                            &ds,
                            View::dense(t, t).t(),
                            qkv,
                            sh.packed(b, h, 0),
                            false,
                            false,
                        );
                    }
                };
                // One thread: stay on the caller (a hop to rayon's single worker costs more
                // than it brings).
                if gemm::parallel() {
                    (0..sh.batch * nh).into_par_iter().for_each(backward_task);
                } else {
                    (0..sh.batch * nh).for_each(backward_task);
                }
                dqkv
            })
        })??;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

/// Multi-head attention over the packed projection `qkv` (`[b·t, 3·hidden]`: Q, K, V side by
/// side, heads contiguous within each), with the per-key additive `bias` (`[b, t]`) and, in
/// training, dropout multipliers `keep` for the probabilities (`[b, heads, t, t]`, each 0 or
/// `1/(1-p)`). Returns the merged context `[b·t, hidden]`.
pub fn attention(
    qkv: &Tensor,
    bias: &Tensor,
    shape: Heads,
    scale: f64,
    keep: Option<Multipliers>,
) -> CResult<Tensor> {
    let Heads {
        batch: b,
        seq: t,
        heads: nh,
        ..
    } = shape;
    let n = b * nh * t * t;
    if let Some(k) = &keep {
        k.check_len(n, &format!("attention ({b}×{nh}×{t}×{t})"))?;
    }
    if is_cpu(qkv) {
        let keep = keep.map(|k| k.host(n));
        let bias = bias.flatten_all()?.to_vec1::<f32>()?;
        return qkv.contiguous()?.apply_op1(Attention {
            shape,
            scale: scale as f32,
            bias,
            keep,
            probs: OnceLock::new(),
        });
    }
    composed(qkv, bias, shape, scale, keep)
}

/// The same attention from differentiable candle ops: the path of non-CPU devices (and of
/// `TANDEM_FUSED_KERNELS=0`), and the reference the fused op is tested against.
fn composed(
    qkv: &Tensor,
    bias: &Tensor,
    shape: Heads,
    scale: f64,
    keep: Option<Multipliers>,
) -> CResult<Tensor> {
    let Heads {
        batch: b,
        seq: t,
        heads: nh,
        head_dim: dh,
    } = shape;
    let hid = nh * dh;
    let part = |i: usize| -> CResult<Tensor> {
        qkv.narrow(D::Minus1, i * hid, hid)?
            .reshape((b, t, nh, dh))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    // Products in the activations' dtype; mask, softmax and dropout in f32 (the bias's dtype).
    let scores = (super::ops::matmul("attention scores", &q, &k.t()?)?.to_dtype(bias.dtype())?
        * scale)?
        .broadcast_add(&bias.reshape((b, 1, 1, t))?)?;
    let mut probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    if let Some(keep) = keep {
        probs = probs.mul(&keep.tensor(probs.shape(), probs.device())?)?;
    }
    super::ops::matmul("attention context", &probs.to_dtype(v.dtype())?, &v)?
        .transpose(1, 2)?
        .reshape((b * t, hid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::ops::tests::{check, rand};
    use candle_core::Device;

    #[test]
    fn attention_matches_composed_with_padding_and_dropout() {
        let s = Heads {
            batch: 2,
            seq: 5,
            heads: 3,
            head_dim: 4,
        };
        let qkv = (rand(&[10, 36], 21) * 2.0).unwrap();
        let mut bias = vec![0f32; 10];
        bias[8] = -1e9;
        bias[9] = -1e9;
        let bias = Tensor::from_vec(bias, (2, 5), &Device::Cpu).unwrap();
        // Every fourth probability dropped, the rest scaled by 1/(1-p).
        let keep: Vec<f32> = (0..2 * 3 * 25)
            .map(|i| if i % 4 == 1 { 0.0 } else { 1.25 })
            .collect();
        for with_dropout in [false, true] {
            let (b1, b2, k1, k2) = (bias.clone(), bias.clone(), keep.clone(), keep.clone());
            check(
                std::slice::from_ref(&qkv),
                move |t| attention(&t[0], &b1, s, 0.5, with_dropout.then(|| k1.clone().into())),
                move |t| composed(&t[0], &b2, s, 0.5, with_dropout.then(|| k2.clone().into())),
                1e-5,
            );
        }
    }

    #[test]
    fn attention_rejects_a_wrong_mask_length() {
        let s = Heads {
            batch: 1,
            seq: 2,
            heads: 1,
            head_dim: 2,
        };
        let qkv = rand(&[2, 6], 1);
        let bias = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = attention(&qkv, &bias, s, 1.0, Some(vec![1.0; 3].into())).unwrap_err();
        assert!(e.to_string().contains("dropout multipliers"), "{e}");
    }
}
