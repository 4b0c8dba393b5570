//! Safe, bounds-checked strided matrix products on f32 slices, over the `gemm` crate (the
//! same microkernels candle's CPU matmul uses).
//!
//! candle's matmul hides two costs our fused ops avoid: it cannot read a matrix through
//! arbitrary strides (so attention heads are copied out with `transpose().contiguous()`),
//! and its batched product runs one small gemm after another, each too small to split
//! across threads. Here a [`View`] names any strided matrix inside a slice, and the fused
//! ops parallelise over whole independent products instead.

use gemm::Parallelism;

/// A `rows × cols` matrix inside a slice: element `(i, j)` is at `off + i·rs + j·cs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// Offset of element `(0, 0)`.
    pub off: usize,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl View {
    /// A dense row-major matrix starting at offset 0.
    pub fn dense(rows: usize, cols: usize) -> View {
        View {
            off: 0,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Rows of width `cols` starting at `off`, `rs` apart (a column block of a wider matrix).
    pub fn block(off: usize, rows: usize, cols: usize, rs: usize) -> View {
        View {
            off,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose: the same memory read column by column.
    pub fn t(self) -> View {
        View {
            off: self.off,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// One past the last element this view touches (0 when empty).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.off;
        }
        self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }
}

/// Whether a product should split across rayon's threads (gemm itself still keeps small
/// products on one thread).
pub fn parallel() -> bool {
    rayon::current_num_threads() > 1
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`), all three as strided views.
/// Panics if the shapes disagree or a view runs past its slice.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    d: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    accumulate: bool,
    par: bool,
) {
    assert!(
        d.end() <= dst.len(),
        "gemm: destination view {d:?} past {}",
        dst.len()
    );
    // SAFETY: the destination view lies within `dst`, which we borrow mutably.
    unsafe { matmul_raw(dst.as_mut_ptr(), d, a, av, b, bv, accumulate, par) }
}

/// A raw destination pointer that may cross threads: for products that write disjoint blocks
/// of one buffer in parallel.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: users only write disjoint views through it (see `matmul_raw`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// As [`matmul`], writing through a raw pointer.
///
/// # Safety
/// `dst` must be valid for writes over the whole view `d`, and no other thread may read or
/// write the elements of `d` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw(
    dst: *mut f32,
    d: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    accumulate: bool,
    par: bool,
) {
    assert!(
        d.rows == av.rows && d.cols == bv.cols && av.cols == bv.rows,
        "gemm: shapes {}×{} = {}×{} · {}×{}",
        d.rows,
        d.cols,
        av.rows,
        av.cols,
        bv.rows,
        bv.cols
    );
    assert!(
        av.end() <= a.len(),
        "gemm: lhs view {av:?} past {}",
        a.len()
    );
    assert!(
        bv.end() <= b.len(),
        "gemm: rhs view {bv:?} past {}",
        b.len()
    );
    let (m, n, k) = (d.rows, d.cols, av.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(d.off + i * d.rs + j * d.cs) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.add(d.off),
        d.cs as isize,
        d.rs as isize,
        accumulate,
        a.as_ptr().add(av.off),
        av.cs as isize,
        av.rs as isize,
        b.as_ptr().add(bv.off),
        bv.cs as isize,
        bv.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        if par {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        },
    );
}

/// Adds the rows of the `rows × width` row-major `x` into `acc` (`acc[j] += Σ_i x[i, j]`),
/// in row order on one thread, so the result never depends on the thread count.
pub fn add_column_sums(acc: &mut [f32], x: &[f32]) {
    let w = acc.len();
    if w == 0 {
        return;
    }
    for r in x.chunks_exact(w) {
        acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], av: View, b: &[f32], bv: View) -> Vec<f32> {
        let mut out = vec![0f32; av.rows * bv.cols];
        for i in 0..av.rows {
            for j in 0..bv.cols {
                let mut s = 0f32;
                for p in 0..av.cols {
                    s += a[av.off + i * av.rs + p * av.cs] * b[bv.off + p * bv.rs + j * bv.cs];
                }
                out[i * bv.cols + j] = s;
            }
        }
        out
    }

    fn seq(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    #[test]
    fn strided_views_match_a_naive_product() {
        // A 3-column block at column 2 of a 5×7 matrix, times the transpose of a block of a
        // 4×6 matrix: exercises offsets, row strides and a transposed view.
        let a = seq(35, 0.1);
        let b = seq(24, 0.7);
        let av = View::block(2, 5, 3, 7);
        let bv = View::block(1, 4, 3, 6).t(); // 3×4
        let want = naive(&a, av, &b, bv);
        for par in [false, true] {
            let mut got = vec![0f32; 20];
            matmul(&mut got, View::dense(5, 4), &a, av, &b, bv, false, par);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            // Accumulating adds the product once more.
            matmul(&mut got, View::dense(5, 4), &a, av, &b, bv, true, par);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 1e-5, "{g} vs {}", 2.0 * w);
            }
        }
    }

    #[test]
    fn empty_inner_dimension_zeroes_or_keeps() {
        let mut d = vec![5f32; 6];
        matmul(
            &mut d,
            View::dense(2, 3),
            &[],
            View::dense(2, 0),
            &[],
            View::dense(0, 3),
            true,
            false,
        );
        assert_eq!(d, vec![5.0; 6]);
        matmul(
            &mut d,
            View::dense(2, 3),
            &[],
            View::dense(2, 0),
            &[],
            View::dense(0, 3),
            false,
            false,
        );
        assert_eq!(d, vec![0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "past")]
    fn a_view_past_its_slice_panics() {
        let mut d = vec![0f32; 4];
        matmul(
            &mut d,
            View::dense(2, 2),
            &[0.0; 3],
            View::dense(2, 2),
            &[0.0; 4],
            View::dense(2, 2),
            false,
            false,
        );
    }

    #[test]
    fn column_sums() {
        let mut acc = vec![1f32, 2.0];
        add_column_sums(&mut acc, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(acc, vec![10.0, 14.0]);
    }
}
