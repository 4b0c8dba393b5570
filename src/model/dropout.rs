//! Dropout masks from a counter-based generator, Philox4x32-10 (Salmon et al., "Parallel
//! random numbers: as easy as 1, 2, 3", SC 2011; the generator cuRAND and PyTorch's CUDA
//! dropout use). The multiplier of element `i` of dropout site `s` is a pure function of
//! (key, s, i), so a mask can be made wherever its values live, in any order: in parallel on
//! the host for the fused CPU kernels, by a CUDA kernel on the GPU (no mask is built on the
//! host and uploaded), and the two are bit-identical, so runs stay reproducible across devices.
//!
//! Element `i` takes word `i mod 4` of `philox(counter = [⌊i/4⌋ lo, ⌊i/4⌋ hi, s, 0], key)`; it
//! is dropped when that word is below `p·2³²`, and otherwise scaled by `1/(1-p)`.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: four random words from a 128-bit counter and a 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The dropout sites of one forward pass: a key from (seed, step, rank, micro-batch, …) and
/// the next site's number (each dropout call takes the next).
#[derive(Debug, Clone)]
pub struct DropoutStream {
    key: [u32; 2],
    site: u32,
}

impl DropoutStream {
    /// The stream keyed by `parts` (e.g. seed, step, rank, micro-batch).
    pub fn new(parts: &[u64]) -> Self {
        let h = crate::util::mix_seed(parts);
        DropoutStream {
            key: [h as u32, (h >> 32) as u32],
            site: 0,
        }
    }

    /// The next site's mask, dropping with probability `p`; `None` when `p` is 0 (the site
    /// still takes its number, so later sites do not move when one is switched off).
    pub fn next(&mut self, p: f32) -> Option<Mask> {
        let site = self.site;
        self.site += 1;
        (p > 0.0).then_some(Mask {
            key: self.key,
            site,
            p,
        })
    }
}

/// One dropout site's mask, not yet made: [`Mask::host`] or [`Mask::tensor`] makes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mask {
    key: [u32; 2],
    site: u32,
    /// Drop probability.
    p: f32,
}

/// Elements a host thread makes at a time (a multiple of 4: one Philox call gives 4).
const HOST_CHUNK: usize = 1 << 14;

impl Mask {
    /// The mask of site `site` under `key`, dropping with probability `p` (tests use it).
    pub fn new(key: [u32; 2], site: u32, p: f32) -> Self {
        Mask { key, site, p }
    }

    /// Words below this are dropped: `p·2³²`, saturated.
    fn threshold(&self) -> u32 {
        (self.p as f64 * 4294967296.0).min(u32::MAX as f64) as u32
    }

    /// What a kept element is multiplied by (inverted dropout).
    fn keep(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Elements `[4g, 4g + out.len())` of the mask (`out.len() <= 4`).
    fn block(&self, g: u64, out: &mut [f32]) {
        let words = philox4x32_10([g as u32, (g >> 32) as u32, self.site, 0], self.key);
        let (threshold, keep) = (self.threshold(), self.keep());
        for (o, w) in out.iter_mut().zip(words) {
            *o = if w < threshold { 0.0 } else { keep };
        }
    }

    /// The first `n` multipliers, made on the host's threads.
    pub fn host(&self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        out.par_chunks_mut(HOST_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let first = (c * HOST_CHUNK / 4) as u64;
                for (j, quad) in chunk.chunks_mut(4).enumerate() {
                    self.block(first + j as u64, quad);
                }
            });
        out
    }

    /// The mask as an f32 tensor of `shape` on `device`, made there (a CUDA kernel on a GPU).
    pub fn tensor(&self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape: Shape = shape.into();
        if device.is_cpu() {
            let n = shape.elem_count();
            return Ok(Tensor::from_vec(self.host(n), shape, device)?);
        }
        // A custom op needs an input: a one-element placeholder on the device (not an empty
        // one: a zero-byte device allocation may be refused).
        let placeholder = Tensor::zeros(1, candle_core::DType::F32, device)?;
        Ok(placeholder.apply_op1_no_bwd(&MaskOp { mask: *self, shape })?)
    }
}

/// Dropout multipliers as a kernel takes them: values already made (tests), or a [`Mask`]
/// made where the kernel needs it (on the host for a fused CPU kernel, on the device for the
/// composed ops).
#[derive(Debug, Clone, PartialEq)]
pub enum Multipliers {
    /// The multipliers themselves, one per element.
    Values(Vec<f32>),
    /// A mask to make where it is needed.
    Mask(Mask),
}

impl From<Vec<f32>> for Multipliers {
    fn from(v: Vec<f32>) -> Self {
        Multipliers::Values(v)
    }
}

impl From<Mask> for Multipliers {
    fn from(m: Mask) -> Self {
        Multipliers::Mask(m)
    }
}

impl Multipliers {
    /// Refuses values whose count is not `n` (`what` names the kernel and its shape).
    pub(crate) fn check_len(&self, n: usize, what: &str) -> candle_core::Result<()> {
        match self {
            Multipliers::Values(v) if v.len() != n => {
                candle_core::bail!("{what}: {} dropout multipliers for {n} values", v.len())
            }
            _ => Ok(()),
        }
    }

    /// The first `n` multipliers on the host.
    pub(crate) fn host(self, n: usize) -> Vec<f32> {
        match self {
            Multipliers::Values(v) => v,
            Multipliers::Mask(m) => m.host(n),
        }
    }

    /// The multipliers as an f32 tensor of `shape` on `device`.
    pub(crate) fn tensor(self, shape: &Shape, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Multipliers::Values(v) => Tensor::from_vec(v, shape, device),
            Multipliers::Mask(m) => m
                .tensor(shape.clone(), device)
                .map_err(|e| candle_core::Error::Msg(e.to_string())),
        }
    }
}

/// Makes a [`Mask`] as a candle op, so that on CUDA it is made by a kernel on the device.
struct MaskOp {
    mask: Mask,
    shape: Shape,
}

impl CustomOp1 for MaskOp {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = self.mask.host(self.shape.elem_count());
        Ok((CpuStorage::F32(v), self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::mask(&self.mask, self.shape.elem_count(), &s.device)?;
        Ok((out, self.shape.clone()))
    }
}

/// The kernel's CUDA C source (`dropout.cu`): the same arithmetic as [`philox4x32_10`] and
/// [`Mask::block`], one thread per 4 elements, compiled by NVRTC on first use.
pub const CUDA_SOURCE: &str = include_str!("dropout.cu");

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::compile_ptx;
    use candle_core::{CudaDevice, CudaStorage};

    use super::{Mask, CUDA_SOURCE};

    fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("dropout mask kernel: {what}: {e:?}"))
    }

    /// The kernel's PTX, compiled once per process by NVRTC.
    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            compile_ptx(CUDA_SOURCE)
                .map(|p| p.to_src())
                .map_err(|e| format!("{e:?}"))
        })
        .as_deref()
        .map_err(|e| err("NVRTC", e))
    }

    /// `n` multipliers of `mask`, made on `dev`.
    pub(super) fn mask(
        mask: &Mask,
        n: usize,
        dev: &CudaDevice,
    ) -> candle_core::Result<CudaStorage> {
        let func = dev.get_or_load_custom_func("tandem_dropout_mask", "tandem_dropout", ptx()?)?;
        // SAFETY: the kernel writes every one of the `n` elements.
        let mut out = unsafe { dev.alloc::<f32>(n.max(1))? };
        let threads = n.div_ceil(4);
        if threads > 0 {
            let cfg = LaunchConfig::for_num_elems(threads as u32);
            let (n64, k0, k1, site) = (n as u64, mask.key[0], mask.key[1], mask.site);
            let (threshold, keep) = (mask.threshold(), mask.keep());
            let mut b = func.builder();
            b.arg(&mut out);
            b.arg(&n64);
            b.arg(&k0);
            b.arg(&k1);
            b.arg(&site);
            b.arg(&threshold);
            b.arg(&keep);
            // SAFETY: the arguments match the kernel's signature in CUDA_SOURCE.
            unsafe { b.launch(cfg) }.map_err(|e| err("launch", e))?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer vectors for Philox4x32-10.
    #[test]
    fn philox_matches_the_published_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn masks_drop_their_fraction_and_depend_on_key_and_site_only() {
        let mut s = DropoutStream::new(&[3, 1, 0, 0]);
        let (a, b) = (s.next(0.1).unwrap(), s.next(0.1).unwrap());
        let n = 100_003; // not a multiple of 4 or of the host chunk
        let ma = a.host(n);
        let dropped = ma.iter().filter(|x| **x == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert!(ma.iter().all(|x| *x == 0.0 || *x == 1.0 / 0.9));
        assert_ne!(ma, b.host(n), "each site its own mask");
        // Made in any order: a prefix is the mask of fewer elements; one element alone agrees.
        assert_eq!(a.host(1000), ma[..1000]);
        let mut one = [0f32; 4];
        a.block(12_345 / 4, &mut one);
        assert_eq!(one[12_345 % 4], ma[12_345]);
        // The same parts give the same stream; p = 0 gives no mask but takes its site.
        let mut again = DropoutStream::new(&[3, 1, 0, 0]);
        assert!(again.next(0.0).is_none());
        assert_eq!(again.next(0.1), Some(b));
        assert_ne!(DropoutStream::new(&[3, 1, 0, 1]).next(0.1), Some(a));
        let t = a.tensor((7, 3), &Device::Cpu).unwrap();
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), ma[..21]);
    }

    /// The CUDA kernel's C source, compiled for the host with the system C compiler (no GPU
    /// needed), makes the same mask as the Rust: the device's masks are the CPU's.
    #[test]
    fn the_cuda_sources_arithmetic_matches_the_host_masks() {
        let dir = std::env::temp_dir().join(format!("tandem-philox-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = Mask::new([0x01234567, 0x89abcdef], 5, 0.1);
        let (threshold, keep_bits) = (m.threshold(), m.keep().to_bits());
        let harness = format!(
            "#define TANDEM_HOST_TEST\n#include <stdio.h>\n#include <string.h>\n{CUDA_SOURCE}\n\
             int main(void) {{ float out[1003], keep; unsigned int bits = {keep_bits}u; \
             memcpy(&keep, &bits, 4); \
             for (unsigned long long g = 0; g * 4 < 1003; g++) \
             tandem_mask_block(out, 1003, g, 0x01234567u, 0x89abcdefu, 5u, {threshold}u, keep); \
             for (int i = 0; i < 1003; i++) {{ memcpy(&bits, &out[i], 4); printf(\"%08x\\n\", bits); }} \
             unsigned int c[4] = {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}; \
             tandem_philox(c, 0xa4093822u, 0x299f31d0u); \
             printf(\"%08x %08x %08x %08x\\n\", c[0], c[1], c[2], c[3]); return 0; }}\n"
        );
        std::fs::write(dir.join("mask.c"), harness).unwrap();
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = std::process::Command::new(&cc)
            .args(["-O2", "-o"])
            .arg(dir.join("mask"))
            .arg(dir.join("mask.c"))
            .status()
            .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
        assert!(built.success(), "the kernel source does not compile as C");
        let out = std::process::Command::new(dir.join("mask"))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let want: Vec<String> = m
            .host(1003)
            .iter()
            .map(|x| format!("{:08x}", x.to_bits()))
            .collect();
        assert_eq!(lines[..1003], want[..]);
        assert_eq!(lines[1003], "d16cfe09 94fdcceb 5001e420 24126ea1");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
