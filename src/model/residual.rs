//! The end of every BERT sub-layer, `LayerNorm(dropout(y) + residual)`, as one custom op.
//!
//! Composed, this is a dropout multiply, an add and a LayerNorm — three passes and three
//! buffers forward, more backward (where candle also sums the gradient reaching the residual
//! from two places). Fused, it is one pass each way. LayerNorm's weight and bias travel as
//! one `[2·hidden]` tensor (`cat` of the two parameters: a few hundred floats) because a
//! candle custom op takes at most three differentiable inputs.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::ops::{contiguous_f32, for_rows, is_cpu, layer_norm, with_f32};

type CResult<T> = candle_core::Result<T>;

struct AddLayerNorm {
    eps: f32,
    keep: Option<Vec<f32>>,
    /// Per row: the normalised sum `x̂`, then the row's `1/σ` — kept for backward.
    saved: OnceLock<(Vec<f32>, Vec<f32>)>,
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
        let h = gb.len() / 2;
        if y.len() != r.len() || l1.dims().last() != Some(&h) {
            candle_core::bail!(
                "add-layer-norm: {:?} + {:?} with {h} features",
                l1.dims(),
                l2.dims()
            )
        }
        let (g, b) = gb.split_at(h);
        let mut xhat = vec![0f32; y.len()];
        let mut rstd = vec![0f32; y.len() / h.max(1)];
        let rstd_ptr = super::gemm::SendPtr(rstd.as_mut_ptr());
        for_rows(&mut xhat, h, |i, xr| {
            let (yr, rr) = (&y[i * h..(i + 1) * h], &r[i * h..(i + 1) * h]);
            match &self.keep {
                Some(k) => {
                    let kr = &k[i * h..(i + 1) * h];
                    for j in 0..h {
                        xr[j] = yr[j] * kr[j] + rr[j];
                    }
                }
                None => {
                    for j in 0..h {
                        xr[j] = yr[j] + rr[j];
                    }
                }
            }
            let mean = xr.iter().sum::<f32>() / h as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let rs = 1.0 / (var + self.eps).sqrt();
            xr.iter_mut().for_each(|v| *v = (*v - mean) * rs);
            // SAFETY: row i writes only rstd[i], and `rstd` outlives the loop.
            unsafe { *rstd_ptr.get().add(i) = rs };
        });
        let mut out = vec![0f32; y.len()];
        for_rows(&mut out, h, |i, o| {
            let xr = &xhat[i * h..(i + 1) * h];
            for j in 0..h {
                o[j] = xr[j] * g[j] + b[j];
            }
        });
        let _ = self.saved.set((xhat, rstd));
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
        let Some((xhat, rstd)) = self.saved.get() else {
            candle_core::bail!("add-layer-norm backward: the forward pass kept nothing")
        };
        let h = gb.elem_count() / 2;
        let gv = gb.flatten_all()?.to_vec1::<f32>()?;
        let g = &gv[..h];
        let (dsum, dgb) = with_f32(dout, |dy| {
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
        })?;
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

/// `LayerNorm(y ⊙ keep + residual)` over the last dimension, `keep` being the dropout
/// multipliers of `y` (0 or `1/(1-p)`; `None` in evaluation).
pub fn add_layer_norm(
    y: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    keep: Option<Vec<f32>>,
) -> CResult<Tensor> {
    if let Some(k) = &keep {
        if k.len() != y.elem_count() {
            candle_core::bail!(
                "add-layer-norm: {} dropout multipliers for {} values",
                k.len(),
                y.elem_count()
            )
        }
    }
    if is_cpu(y) {
        let gb = Tensor::cat(&[gamma, beta], 0)?;
        return y.contiguous()?.apply_op3(
            &residual.contiguous()?,
            &gb,
            AddLayerNorm {
                eps: eps as f32,
                keep,
                saved: OnceLock::new(),
            },
        );
    }
    let y = match keep {
        Some(k) => y.mul(&Tensor::from_vec(k, y.shape(), y.device())?)?,
        None => y.clone(),
    };
    layer_norm(&(y + residual)?, gamma, beta, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{check, rand};
    use candle_core::Device;

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
                        with_dropout.then(|| k1.clone()),
                    )
                },
                move |t| {
                    let y = if with_dropout {
                        t[0].mul(&k2)?
                    } else {
                        t[0].clone()
                    };
                    let x = (y + &t[1])?;
                    let mean = x.mean_keepdim(1)?;
                    let xc = x.broadcast_sub(&mean)?;
                    let var = xc.sqr()?.mean_keepdim(1)?;
                    xc.broadcast_div(&(var + 1e-12)?.sqrt()?)?
                        .broadcast_mul(&t[2])?
                        .broadcast_add(&t[3])
                },
                1e-5,
            );
        }
    }
}
