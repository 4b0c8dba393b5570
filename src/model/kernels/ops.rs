//! Helpers shared by the fused CPU kernels (row loops, CPU data access, the switch between
//! fused and composed ops), and the cross-entropy kernel.
//!
//! candle's own fused CPU ops (`candle_nn::ops::layer_norm`, `softmax_last_dim`) have no
//! backward and silently cut the autograd graph; composing them from elementary ops is
//! correct but slow (an allocation and a pass over memory per elementary op). Our kernels
//! (here, `linear`, `attention`, `norm`) do one pass forward and one backward over contiguous
//! f32 rows; on other devices the same functions fall back to differentiable composed candle
//! ops. Each is checked against its composed equivalent, and the finite-difference test at the
//! bottom of this file goes through LayerNorm and the fused Linear with GELU.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::vmath;

type CResult<T> = candle_core::Result<T>;

/// Rows of at least this many elements in total are split across rayon's threads.
const PAR_MIN: usize = 1 << 14;

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous input")
    };
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (copying only if it is strided).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => Ok(f(contiguous_f32(c, l, "fused op")?)),
        _ => candle_core::bail!("fused op backward: expected a CPU tensor"),
    }
}

pub(crate) fn for_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() >= PAR_MIN && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Whether the fused CPU kernels are in use: yes, unless the environment sets
/// `TANDEM_FUSED_KERNELS=0`. Off, every op composes differentiable candle ops — the path CUDA
/// devices take — so that path can be checked against the reference on a CPU-only machine.
pub fn fused_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TANDEM_FUSED_KERNELS").map_or(true, |v| v != "0"))
}

/// Whether `t` goes through the fused CPU kernels (f32 on the CPU, kernels not switched off).
pub(crate) fn is_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && fused_kernels()
}

// ------------------------------------------------ CUDA's matmul layout rule, on every device

/// `a · b` as [`Tensor::matmul`], refused first when candle's CUDA backend would refuse it or
/// one of the two products its backward takes (`g · bᵀ` and `aᵀ · g`, `g` contiguous). The
/// CPU matmul accepts any strides, so without this check the composed path — what a GPU
/// runs — passes every CPU test with a layout that fails at the GPU's first forward.
pub(crate) fn matmul(op: &str, a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    check_matmul(op, a, b)?;
    a.matmul(b)
}

/// The layout rule of candle's CUDA matmul (`gemm_config` in its CUDA backend) for `a · b`
/// and for the products of its backward.
pub(crate) fn check_matmul(op: &str, a: &Tensor, b: &Tensor) -> CResult<()> {
    let (a, b) = (Operand::of(a), Operand::of(b));
    let g = |dims: Vec<usize>| Operand {
        stride: contiguous_strides(&dims),
        dims,
    };
    let mut out_dims = a.dims.clone();
    *out_dims.last_mut().expect("a matmul operand has 2+ dims") = *b.dims.last().unwrap();
    for (what, l, r) in [
        ("forward", a.clone(), b.clone()),
        ("backward (g · bᵀ)", g(out_dims.clone()), b.t()),
        ("backward (aᵀ · g)", a.t(), g(out_dims)),
    ] {
        if !cuda_accepts(&l, &r) {
            candle_core::bail!(
                "{op}: a {what} matmul with operand layouts {:?}/{:?} and {:?}/{:?} (dims/strides) \
                 would fail on CUDA (MatMulNonContiguous): each operand must be contiguous or \
                 transposed-contiguous in its last two dims; make it `.contiguous()`",
                l.dims,
                l.stride,
                r.dims,
                r.stride
            );
        }
    }
    Ok(())
}

/// A matmul operand's dims and strides.
#[derive(Clone)]
struct Operand {
    dims: Vec<usize>,
    stride: Vec<usize>,
}

impl Operand {
    fn of(t: &Tensor) -> Self {
        Operand {
            dims: t.dims().to_vec(),
            stride: t.stride().to_vec(),
        }
    }

    /// The operand with its last two dims swapped (a view, as `Tensor::t`).
    fn t(&self) -> Self {
        let (mut dims, mut stride) = (self.dims.clone(), self.stride.clone());
        let n = dims.len();
        dims.swap(n - 1, n - 2);
        stride.swap(n - 1, n - 2);
        Operand { dims, stride }
    }
}

fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Whether candle's CUDA backend accepts `lhs [.., m, k] · rhs [.., k, n]` with these strides.
fn cuda_accepts(lhs: &Operand, rhs: &Operand) -> bool {
    let (nl, nr) = (lhs.dims.len(), rhs.dims.len());
    let (m, k, n) = (lhs.dims[nl - 2], lhs.dims[nl - 1], rhs.dims[nr - 1]);
    let (l1, l2) = (lhs.stride[nl - 1], lhs.stride[nl - 2]);
    let (r1, r2) = (rhs.stride[nr - 1], rhs.stride[nr - 2]);
    let rhs_ok = ((r1 == 1 || n == 1) && (r2 == n || k == 1))
        || ((r1 == k || n == 1) && (r2 == 1 || k == 1));
    let lhs_ok = ((l1 == 1 || k == 1) && (l2 == k || m == 1))
        || ((l1 == m || k == 1) && (l2 == 1 || m == 1));
    rhs_ok && lhs_ok && batch_stride_ok(lhs) && batch_stride_ok(rhs)
}

/// The batch dims collapse to one stride (candle's CUDA matmul is a strided-batched gemm).
fn batch_stride_ok(o: &Operand) -> bool {
    let nb = o.dims.len() - 2;
    match (&o.stride[..nb], &o.dims[..nb]) {
        ([s1, s2], [d0, d1]) => *s1 == s2 * d1 || *d0 == 1 || *d1 == 1,
        ([_], _) | ([], _) => true,
        _ => false,
    }
}

// ------------------------------------------------ cross-entropy (sum) with labels

/// Sum over rows of `-log softmax(logits)[label]`; the labels live in the op (they carry no
/// gradient). Produces a scalar.
struct CrossEntropySum {
    labels: Vec<u32>,
}

/// `(max, ln Σ e^(r - max))` of a row; `scratch` is overwritten.
fn log_softmax_row(r: &[f32], scratch: &mut Vec<f32>) -> (f32, f32) {
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scratch.clear();
    scratch.extend_from_slice(r);
    (max, vmath::exp_shifted_sum(scratch, max).ln())
}

impl CustomOp1 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "tandem-cross-entropy-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (rows, v) = l.shape().dims2()?;
        if rows != self.labels.len() {
            candle_core::bail!(
                "cross-entropy: {rows} rows but {} labels",
                self.labels.len()
            )
        }
        let mut total = 0f64;
        let mut scratch = Vec::with_capacity(v);
        for (i, &lab) in self.labels.iter().enumerate() {
            let r = &x[i * v..(i + 1) * v];
            let (max, lse) = log_softmax_row(r, &mut scratch);
            total += (max + lse - r[lab as usize]) as f64;
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dl: &Tensor) -> CResult<Option<Tensor>> {
        let g = dl.to_scalar::<f32>()?;
        let (_, v) = x.dims2()?;
        let dx = with_f32(x, |x| {
            let mut dx = vec![0f32; x.len()];
            for_rows(&mut dx, v, |i, dr| {
                let r = &x[i * v..(i + 1) * v];
                let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                dr.copy_from_slice(r);
                let lse = vmath::exp_shifted_sum(dr, max).ln();
                // dr = e^(r - max) now; the softmax is that / e^lse.
                let scale = g * (-lse).exp();
                dr.iter_mut().for_each(|d| *d *= scale);
                dr[self.labels[i] as usize] -= g;
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// A scalar zero that still depends on `t`, so every parameter behind `t` gets a (zero)
/// gradient. (Not `x * 0.0`: candle's backward prunes an affine op whose factor is 0.)
pub fn zero_in_graph(t: &Tensor) -> CResult<Tensor> {
    t.sum_all()?.mul(&Tensor::zeros((), t.dtype(), t.device())?)
}

/// Sum of the cross-entropy of each row of `logits` (`[n, classes]`) against `labels`.
pub fn cross_entropy_sum(logits: &Tensor, labels: &[u32]) -> CResult<Tensor> {
    let (n, c) = logits.dims2()?;
    if n != labels.len() {
        candle_core::bail!("cross-entropy: {n} rows but {} labels", labels.len())
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= c) {
        candle_core::bail!("cross-entropy: label {bad} is outside the {c} classes")
    }
    if n == 0 {
        // Keep the graph connected so every parameter still gets a (zero) gradient.
        return zero_in_graph(logits);
    }
    if is_cpu(logits) {
        return logits.contiguous()?.apply_op1(CrossEntropySum {
            labels: labels.to_vec(),
        });
    }
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::from_slice(labels, (n, 1), logits.device())?;
    lsm.gather(&idx, 1)?.sum_all()?.neg()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(crate) fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / scale
    }

    /// Compares a fused op against its composed reference on outputs and all gradients,
    /// with a random upstream gradient `w` (loss = sum(out * w)).
    pub(crate) fn check(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> CResult<Tensor>,
        composed: impl Fn(&[Tensor]) -> CResult<Tensor>,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fused(&ts).unwrap();
        let yc = composed(&ts).unwrap();
        assert!(
            max_rel(&yf, &yc) < tol,
            "forward differs: {}",
            max_rel(&yf, &yc)
        );
        let w = rand(yf.dims(), 99);
        let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            let (a, b) = (gf.get(t), gc.get(t));
            match (a, b) {
                (Some(a), Some(b)) => {
                    let r = max_rel(a, b);
                    assert!(r < tol, "gradient of input {i} differs: {r}");
                }
                (None, None) => {}
                _ => panic!("input {i}: one version has a gradient, the other not"),
            }
        }
    }

    #[test]
    fn cross_entropy_matches_composed() {
        let x = (rand(&[5, 11], 7) * 3.0).unwrap();
        let labels = vec![0u32, 10, 3, 3, 7];
        let l2 = labels.clone();
        check(
            &[x],
            move |t| cross_entropy_sum(&t[0], &labels),
            move |t| {
                let lsm = candle_nn::ops::log_softmax(&t[0], 1)?;
                let idx = Tensor::from_slice(&l2, (5, 1), &Device::Cpu)?;
                lsm.gather(&idx, 1)?.sum_all()?.neg()
            },
            1e-5,
        );
    }

    #[test]
    fn cross_entropy_rejects_out_of_range_labels() {
        let x = rand(&[2, 3], 8);
        let e = cross_entropy_sum(&x, &[0, 3]).unwrap_err().to_string();
        assert!(e.contains("label 3"), "{e}");
    }

    /// Finite differences in f64 on the fused kernels' gradients (central differences).
    #[test]
    fn fused_gradients_pass_finite_differences() {
        let x = rand(&[3, 8], 11);
        let g = (rand(&[8], 12) + 1.0).unwrap();
        let b = rand(&[8], 13);
        let w = rand(&[3, 8], 14);
        let lw = rand(&[8, 8], 15);
        // LayerNorm, then the fused Linear with its GELU.
        let net = |x: &Tensor| {
            let y = crate::model::kernels::norm::layer_norm(x, &g, &b, 1e-5).unwrap();
            crate::model::kernels::linear::linear(
                &y,
                &lw,
                &b,
                crate::model::kernels::linear::Act::Gelu,
            )
            .unwrap()
        };
        let f = |x: &Tensor| -> f64 {
            let y = net(x);
            (y * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let xv = Var::from_tensor(&x).unwrap();
        let y = net(xv.as_tensor());
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let an = grads
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += eps;
            let fp = f(&Tensor::from_vec(p.clone(), (3, 8), &Device::Cpu).unwrap());
            p[i] -= 2.0 * eps;
            let fm = f(&Tensor::from_vec(p, (3, 8), &Device::Cpu).unwrap());
            let num = (fp - fm) / (2.0 * eps as f64);
            let err = (num - an[i] as f64).abs();
            assert!(
                err < 2e-3 * (1.0 + num.abs()),
                "element {i}: numeric {num}, analytic {}",
                an[i]
            );
        }
    }

    #[test]
    fn matmul_layouts_follow_cudas_rule() {
        let x = rand(&[4, 3, 8], 1); // [batch, seq, hidden]
        let w = rand(&[5, 8], 2);
        let rows = x.reshape((12, 8)).unwrap();
        // Contiguous, and transposed-contiguous (`w.t()`): accepted, forward and backward.
        check_matmul("t", &rows, &w.t().unwrap()).unwrap();
        check_matmul("t", &w, &rows.t().unwrap()).unwrap();
        // A strided row view (every sequence's first token) is refused, naming the fix.
        let cls = x.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let e = check_matmul("pool", &cls, &w.t().unwrap()).unwrap_err();
        assert!(e.to_string().contains("pool: a forward matmul"), "{e}");
        assert!(e.to_string().contains(".contiguous()"), "{e}");
        check_matmul("pool", &cls.contiguous().unwrap(), &w.t().unwrap()).unwrap();
        // Batched: heads split out of one projection and made contiguous are accepted; a
        // transpose of the batch dims is not a strided batch CUDA can take.
        let q = rand(&[2, 4, 3, 6], 3); // [batch, heads, seq, head_dim]
        check_matmul("scores", &q, &q.t().unwrap()).unwrap();
        let swapped = q.transpose(0, 1).unwrap(); // batch strides no longer collapse
        let e = check_matmul("scores", &swapped, &swapped.t().unwrap());
        assert!(e.is_err());
        // A column slice of a wider matrix: its rows are 16 apart, not 8, so it is refused.
        let wide = rand(&[12, 16], 4);
        let half = wide.narrow(1, 0, 8).unwrap();
        assert!(check_matmul("slice", &half, &w.t().unwrap()).is_err());
    }
}
