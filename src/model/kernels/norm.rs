//! LayerNorm, alone and as the end of every BERT sub-layer, `LayerNorm(dropout(y) + residual)`,
//! as candle custom ops sharing one kernel.
//!
//! Composed, the sub-layer end is a dropout multiply, an add and a LayerNorm — three passes and
//! three buffers forward, more backward (where candle also sums the gradient reaching the
//! residual from two places). Fused, it is one pass each way. The normalised rows and their
//! `1/σ` are kept from forward, so backward recomputes no statistics. LayerNorm's weight and
//! bias travel as one `[2·hidden]` tensor (`cat` of the two parameters: a few hundred floats)
//! because a candle custom op takes at most three differentiable inputs.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};

use super::gemm::SendPtr;
use super::ops::{contiguous_f32, for_rows, is_cpu, with_f32};
use crate::model::dropout::Multipliers;

type CResult<T> = candle_core::Result<T>;

/// The normalisation both ops share, with what its backward needs.
struct Norm {
    eps: f32,
    /// Per row: the normalised input `x̂`, then the row's `1/σ`.
    saved: OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl Norm {
    fn new(eps: f64) -> Self {
        Norm {
            eps: eps as f32,
            saved: OnceLock::new(),
        }
    }

    /// Normalises the rows of `x` (overwritten by `x̂`, which is kept) and returns
    /// `x̂ · gamma + beta`; `gb` is `[gamma | beta]`.
    fn forward(&self, mut x: Vec<f32>, gb: &[f32]) -> Vec<f32> {
        let h = gb.len() / 2;
        let (g, b) = gb.split_at(h);
        let mut rstd = vec![0f32; x.len() / h.max(1)];
        let rstd_ptr = SendPtr(rstd.as_mut_ptr());
        for_rows(&mut x, h, |i, xr| {
            let mean = xr.iter().sum::<f32>() / h as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let rs = 1.0 / (var + self.eps).sqrt();
            xr.iter_mut().for_each(|v| *v = (*v - mean) * rs);
            // SAFETY: row i writes only rstd[i], and `rstd` outlives the loop.
            unsafe { *rstd_ptr.get().add(i) = rs };
        });
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, h, |i, o| {
            let xr = &x[i * h..(i + 1) * h];
            for j in 0..h {
                o[j] = xr[j] * g[j] + b[j];
            }
        });
        let _ = self.saved.set((x, rstd));
        out
    }

    /// Gradients with respect to the normalised input and to `[gamma | beta]`.
    fn backward(&self, gb: &Tensor, dout: &Tensor) -> CResult<(Vec<f32>, Vec<f32>)> {
        let Some((xhat, rstd)) = self.saved.get() else {
            candle_core::bail!("layer-norm backward: the forward pass kept nothing")
        };
        let h = gb.elem_count() / 2;
        let gv = gb.flatten_all()?.to_vec1::<f32>()?;
        let g = &gv[..h];
        with_f32(dout, |dy| {
            let mut dx = vec![0f32; dy.len()];
            for_rows(&mut dx, h, |i, dxr| {
                let (xr, dyr) = (&xhat[i * h..(i + 1) * h], &dy[i * h..(i + 1) * h]);
                let (mut s1, mut s2) = (0f32, 0f32);
                for j in 0..h {
                    let d = dyr[j] * g[j];
                    s1 += d;
                    s2 += d * xr[j];
                }
                let (m1, m2) = (s1 / h as f32, s2 / h as f32);
                for j in 0..h {
                    dxr[j] = rstd[i] * (dyr[j] * g[j] - m1 - xr[j] * m2);
                }
            });
            let mut dgb = vec![0f32; 2 * h];
            let (dg, db) = dgb.split_at_mut(h);
            for (xr, dyr) in xhat.chunks_exact(h).zip(dy.chunks_exact(h)) {
                for j in 0..h {
                    dg[j] += dyr[j] * xr[j];
                    db[j] += dyr[j];
                }
            }
            (dx, dgb)
        })
    }
}

fn check_width(op: &str, dims: &[usize], gb: &[f32]) -> CResult<()> {
    if dims.last() != Some(&(gb.len() / 2)) {
        candle_core::bail!("{op}: input {dims:?} with {} features", gb.len() / 2)
    }
    Ok(())
}

/// `LayerNorm(x)`.
struct LayerNorm(Norm);

impl CustomOp2 for LayerNorm {
    fn name(&self) -> &'static str {
        "tandem-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let gb = contiguous_f32(s2, l2, self.name())?;
        check_width(self.name(), l1.dims(), gb)?;
        let out = self.0.forward(x.to_vec(), gb);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgb) = self.0.backward(gb, dout)?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dgb, gb.shape(), gb.device())?),
        ))
    }
}

/// `LayerNorm(y ⊙ keep + residual)`.
struct AddLayerNorm {
    norm: Norm,
    keep: Option<Vec<f32>>,
}

impl CustomOp3 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "tandem-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, self.name())?;
        let r = contiguous_f32(s2, l2, self.name())?;
        let gb = contiguous_f32(s3, l3, self.name())?;
        check_width(self.name(), l1.dims(), gb)?;
        if y.len() != r.len() {
            candle_core::bail!("{}: {:?} + {:?}", self.name(), l1.dims(), l2.dims())
        }
        let sum: Vec<f32> = match &self.keep {
            Some(k) => y
                .iter()
                .zip(k)
                .zip(r)
                .map(|((y, k), r)| y * k + r)
                .collect(),
            None => y.iter().zip(r).map(|(y, r)| y + r).collect(),
        };
        let out = self.norm.forward(sum, gb);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        r: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dsum, dgb) = self.norm.backward(gb, dout)?;
        let dy = match &self.keep {
            None => dsum.clone(),
            Some(k) => dsum.iter().zip(k).map(|(d, k)| d * k).collect(),
        };
        let dev = y.device();
        Ok((
            Some(Tensor::from_vec(dy, y.shape(), dev)?),
            Some(Tensor::from_vec(dsum, r.shape(), dev)?),
            Some(Tensor::from_vec(dgb, gb.shape(), dev)?),
        ))
    }
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> CResult<Tensor> {
    if is_cpu(x) {
        let gb = Tensor::cat(&[gamma, beta], 0)?;
        return x.contiguous()?.apply_op2(&gb, LayerNorm(Norm::new(eps)));
    }
    // Statistics in the parameters' dtype (f32) even when activations are bf16.
    let dt = x.dtype();
    let x = x.to_dtype(gamma.dtype())?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(gamma)?.broadcast_add(beta)?.to_dtype(dt)
}

/// `LayerNorm(y ⊙ keep + residual)` over the last dimension, `keep` being the dropout
/// multipliers of `y` (0 or `1/(1-p)`; `None` in evaluation).
pub fn add_layer_norm(
    y: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    keep: Option<Multipliers>,
) -> CResult<Tensor> {
    if let Some(k) = &keep {
        k.check_len(y.elem_count(), "add-layer-norm")?;
    }
    if is_cpu(y) {
        let keep = keep.map(|k| k.host(y.elem_count()));
        let gb = Tensor::cat(&[gamma, beta], 0)?;
        return y.contiguous()?.apply_op3(
            &residual.contiguous()?,
            &gb,
            AddLayerNorm {
                norm: Norm::new(eps),
                keep,
            },
        );
    }
    // The residual sum and the statistics in f32 (the parameters' dtype), the output in the
    // activations' dtype.
    let dt = y.dtype();
    let (y, residual) = (
        y.to_dtype(gamma.dtype())?,
        residual.to_dtype(gamma.dtype())?,
    );
    let y = match keep {
        Some(k) => y.mul(&k.tensor(y.shape(), y.device())?)?,
        None => y,
    };
    layer_norm(&(y + residual)?, gamma, beta, eps)?.to_dtype(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::ops::tests::{check, rand};
    use candle_core::Device;

    /// LayerNorm over dimension 1 from elementary candle ops.
    fn composed_ln(x: &Tensor, g: &Tensor, b: &Tensor) -> CResult<Tensor> {
        let mean = x.mean_keepdim(1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(1)?;
        xc.broadcast_div(&(var + 1e-12)?.sqrt()?)?
            .broadcast_mul(g)?
            .broadcast_add(b)
    }

    #[test]
    fn layer_norm_matches_composed() {
        let x = rand(&[6, 16], 1);
        let g = (rand(&[16], 2) + 1.0).unwrap();
        let b = rand(&[16], 3);
        check(
            &[x, g, b],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-12),
            |t| composed_ln(&t[0], &t[1], &t[2]),
            1e-5,
        );
    }

    #[test]
    fn add_layer_norm_matches_composed() {
        let keep: Vec<f32> = (0..48)
            .map(|i| if i % 5 == 2 { 0.0 } else { 1.0 / 0.9 })
            .collect();
        let keep_t = Tensor::from_vec(keep.clone(), (6, 8), &Device::Cpu).unwrap();
        for with_dropout in [false, true] {
            let (k1, k2) = (keep.clone(), keep_t.clone());
            check(
                &[
                    (rand(&[6, 8], 1) * 3.0).unwrap(),
                    rand(&[6, 8], 2),
                    (rand(&[8], 3) + 1.0).unwrap(),
                    rand(&[8], 4),
                ],
                move |t| {
                    add_layer_norm(
                        &t[0],
                        &t[1],
                        &t[2],
                        &t[3],
                        1e-12,
                        with_dropout.then(|| k1.clone().into()),
                    )
                },
                move |t| {
                    let y = if with_dropout {
                        t[0].mul(&k2)?
                    } else {
                        t[0].clone()
                    };
                    composed_ln(&(y + &t[1])?, &t[2], &t[3])
                },
                1e-5,
            );
        }
    }
}
