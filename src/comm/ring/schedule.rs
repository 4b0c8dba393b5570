//! Segment and chunk arithmetic of the ring, and the byte views used on the wire.

use super::*;

/// Segment `i` of `n` over `len` elements: the first `len % n` segments hold one extra.
pub(crate) fn segment(len: usize, n: usize, i: usize) -> Range<usize> {
    let (base, rem) = (len / n, len % n);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

pub(super) fn n_chunks(seg: &Range<usize>, ce: usize) -> usize {
    seg.len().div_ceil(ce)
}

/// One all-reduce's schedule: at step `t` of `2(n-1)` this rank sends segment
/// `(rank - t) mod n` and receives segment `(rank - t - 1) mod n`, which its predecessor sends
/// at the same step. The first `n-1` steps add what arrives (reduce-scatter); after them this
/// rank holds the finished segment `rank + 1`, and the last `n-1` steps pass finished segments
/// on, overwriting (all-gather). Each finished segment is summed once, in one order, by one rank
/// and then copied bit for bit: every rank ends with identical floats.
pub(super) struct Schedule {
    pub(super) len: usize,
    pub(super) n: usize,
    pub(super) rank: usize,
}

impl Schedule {
    /// The segment this rank sends at step `t`.
    pub(super) fn send_segment(&self, t: usize) -> usize {
        (self.rank + self.n - t % self.n) % self.n
    }
    /// The segment this rank receives at step `t`.
    pub(super) fn recv_segment(&self, t: usize) -> usize {
        (self.rank + 2 * self.n - 1 - t % self.n) % self.n
    }
    pub(super) fn part(&self, t: usize, c: usize, chunks: usize) -> Part {
        let (phase, step) = if t < self.n - 1 {
            ("reduce-scatter", t)
        } else {
            ("all-gather", t + 1 - self.n)
        };
        Part::Chunk {
            phase,
            step,
            steps: self.n - 1,
            chunk: c,
            chunks,
        }
    }
}

/// `dst[i] += src[i]`, `src` being little-endian f32 bytes.
pub(super) fn add_le(dst: &mut [f32], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d += f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the ring sends f32 in memory order, the wire format only on little-endian targets");

/// The bytes of `v` as they lie in memory: little-endian f32, the wire format.
pub(super) fn bytes_of(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding, so all `size_of_val(v)` bytes are initialised; u8 needs no
    // alignment; the result borrows `v`, so the memory stays alive and unwritten meanwhile.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// As [`bytes_of`], writable: received bytes land in the buffer without a copy.
pub(super) fn bytes_of_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as for `bytes_of`, and every bit pattern is a valid f32, so any bytes written
    // through the result leave `v` valid; the result borrows `v` exclusively.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A buffer cut into the chunks of every segment; `slots[first[i] + c]` is chunk `c` of
/// segment `i`, or `None` while lent to the sender thread.
pub(super) struct Chunks<'a> {
    pub(super) slots: Vec<Option<&'a mut [f32]>>,
    pub(super) first: Vec<usize>,
}

impl<'a> Chunks<'a> {
    pub(super) fn split(buf: &'a mut [f32], n: usize, ce: usize) -> Self {
        let len = buf.len();
        let (mut slots, mut first) = (Vec::new(), Vec::with_capacity(n));
        let mut rest = buf;
        for i in 0..n {
            let (mut seg, tail) = std::mem::take(&mut rest).split_at_mut(segment(len, n, i).len());
            rest = tail;
            first.push(slots.len());
            while !seg.is_empty() {
                let k = ce.min(seg.len());
                let (c, tail) = std::mem::take(&mut seg).split_at_mut(k);
                slots.push(Some(c));
                seg = tail;
            }
        }
        Chunks { slots, first }
    }
}
