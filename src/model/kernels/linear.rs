//! Fused Linear, `y = act(x Wᵀ + b)`, as one candle custom op with its own backward.
//!
//! candle composes a linear layer as matmul + `broadcast_add`: a second pass over the output
//! forward, and backward a reduction for the bias plus candle's generic matmul backward (which
//! materialises transposed copies). Here the bias is the gemm's starting value, the optional
//! GELU is applied in the same pass, and backward is three strided gemms and a column sum.
//! On other devices the same function falls back to composed candle ops.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::gemm::{self, View};
use super::ops::{for_rows, is_cpu, with_f32};
use super::vmath;

type CResult<T> = candle_core::Result<T>;

/// The activation applied after the affine map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// None: the affine map alone.
    Identity,
    /// The exact (erf) GELU, HF BERT's `"gelu"`.
    Gelu,
}

struct LinearOp {
    act: Act,
    /// The pre-activation `x Wᵀ + b`, kept for GELU's backward.
    pre: OnceLock<Vec<f32>>,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "tandem-linear"
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
        let x = super::ops::contiguous_f32(s1, l1, self.name())?;
        let w = super::ops::contiguous_f32(s2, l2, self.name())?;
        let b = super::ops::contiguous_f32(s3, l3, self.name())?;
        let (n, k) = l2.shape().dims2()?;
        if b.len() != n || l1.dims().last() != Some(&k) {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, bias {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let m = x.len() / k.max(1);
        let mut y = Vec::with_capacity(m * n);
        for _ in 0..m {
            y.extend_from_slice(b);
        }
        gemm::matmul(
            &mut y,
            View::dense(m, n),
            x,
            View::dense(m, k),
            w,
            View::dense(n, k).t(),
            true,
            gemm::parallel(),
        );
        if self.act == Act::Gelu {
            let mut out = vec![0f32; y.len()];
            for_rows(&mut out, n, |i, r| vmath::gelu(&y[i * n..(i + 1) * n], r));
            let _ = self.pre.set(y);
            y = out;
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let par = gemm::parallel();
        if self.act == Act::Gelu && self.pre.get().is_none() {
            candle_core::bail!("linear backward: the forward pass kept no pre-activation")
        }
        let (dx, dw, db) = with_f32(dy, |dy| {
            // The gradient before the activation: dy itself without one (no copy).
            let gelu_dz;
            let dz: &[f32] = match (self.act, self.pre.get()) {
                (Act::Gelu, Some(z)) => {
                    let mut d = vec![0f32; dy.len()];
                    for_rows(&mut d, n, |i, r| {
                        vmath::gelu_backward(&z[i * n..(i + 1) * n], &dy[i * n..(i + 1) * n], r)
                    });
                    gelu_dz = d;
                    &gelu_dz
                }
                _ => dy,
            };
            with_f32(x, |x| {
                with_f32(w, |w| {
                    let mut dx = vec![0f32; m * k];
                    let dzv = View::dense(m, n);
                    gemm::matmul(
                        &mut dx,
                        View::dense(m, k),
                        dz,
                        dzv,
                        w,
                        View::dense(n, k),
                        false,
                        par,
                    );
                    let mut dw = vec![0f32; n * k];
                    gemm::matmul(
                        &mut dw,
                        View::dense(n, k),
                        dz,
                        dzv.t(),
                        x,
                        View::dense(m, k),
                        false,
                        par,
                    );
                    let mut db = vec![0f32; n];
                    gemm::add_column_sums(&mut db, dz);
                    (dx, dw, db)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `act(x Wᵀ + b)` with PyTorch's `nn.Linear` layout (`w` is `[out, in]`, `b` is `[out]`),
/// over the last dimension of `x`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, act: Act) -> CResult<Tensor> {
    if is_cpu(x) {
        return x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LinearOp {
                act,
                pre: OnceLock::new(),
            },
        );
    }
    // Mixed precision: the f32 master weights are cast to the activations' dtype (bf16); the
    // cast is in the graph, so their gradients come back as f32.
    let (w, b) = (w.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
    // Rows flattened to one batch of rows, as the fused op reads them.
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("linear input has a feature dim") = w.dim(0)?;
    let rows = x.flatten_to(x.rank().saturating_sub(2))?;
    let y = super::ops::matmul("linear", &rows, &w.t()?)?
        .broadcast_add(&b)?
        .reshape(out_dims)?;
    match act {
        Act::Identity => Ok(y),
        Act::Gelu => y.gelu_erf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::ops::tests::{check, rand};

    #[test]
    fn linear_matches_composed() {
        for act in [Act::Identity, Act::Gelu] {
            let x = (rand(&[2, 5, 7], 1) * 2.0).unwrap();
            let w = rand(&[6, 7], 2);
            let b = rand(&[6], 3);
            check(
                &[x, w, b],
                |t| linear(&t[0], &t[1], &t[2], act),
                |t| {
                    let y = t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2])?;
                    match act {
                        Act::Identity => Ok(y),
                        Act::Gelu => y.gelu_erf(),
                    }
                },
                1e-5,
            );
        }
    }

    #[test]
    fn linear_reads_a_strided_input() {
        // A column slice is not contiguous: the op must see the same values.
        let x = rand(&[4, 10], 4);
        let xs = x.narrow(1, 2, 5).unwrap();
        let w = rand(&[3, 5], 5);
        let b = rand(&[3], 6);
        let got = linear(&xs, &w, &b, Act::Identity).unwrap();
        let want = xs.contiguous().unwrap().matmul(&w.t().unwrap()).unwrap();
        let want = want.broadcast_add(&b).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
