//! The parameter store: named trainable tensors in sorted-name order, seeded initialisation,
//! and the flat f32 layout that gradients and the optimiser use.
//!
//! Order matters: every rank must pack its gradients into the all-reduce buffers in the same
//! order (candle's `VarMap` iterates a `HashMap`, which differs between processes), so the
//! store keeps its parameters sorted by name.

use std::collections::{BTreeMap, HashMap};

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};
use crate::util;

/// How a parameter is initialised (BERT's scheme: normal(0, initializer_range) for weights
/// and embeddings, zero biases, LayerNorm weight 1, padding embedding row 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, `initializer_range`).
    Normal,
    /// Normal, with row `pad` set to zero (an embedding with a padding index).
    NormalPadRow(usize),
    /// All zero.
    Zeros,
    /// All one.
    Ones,
}

/// One trainable tensor of a model: its HF name, shape and initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// The HF name, e.g. `bert.embeddings.word_embeddings.weight`.
    pub name: String,
    /// The tensor's dimensions.
    pub shape: Vec<usize>,
    /// How it is initialised.
    pub init: Init,
}

impl ParamSpec {
    /// A parameter `name` of `shape`, initialised by `init`.
    pub(crate) fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }

    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// AdamW's decoupled weight decay applies to all but biases and LayerNorm weights.
    pub fn decays(&self) -> bool {
        !(self.name.ends_with("bias") || self.name.contains("LayerNorm"))
    }
}

/// Trainable parameters, sorted by name, with their offsets in the flat layout.
pub struct ParamStore {
    device: Device,
    specs: Vec<ParamSpec>,
    vars: Vec<Var>,
    offsets: Vec<usize>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// Initialises every parameter from `seed`. Each tensor draws from its own stream, keyed by
    /// its name, so adding a head does not change the initial values of the others.
    pub fn init(mut specs: Vec<ParamSpec>, std: f32, seed: u64, device: &Device) -> Result<Self> {
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let values = specs
            .iter()
            .map(|s| init_values(s, std, seed))
            .collect::<Vec<_>>();
        Self::from_values(specs, values, device)
    }

    fn from_values(specs: Vec<ParamSpec>, values: Vec<Vec<f32>>, device: &Device) -> Result<Self> {
        let mut vars = Vec::with_capacity(specs.len());
        let mut offsets = Vec::with_capacity(specs.len() + 1);
        let mut index = HashMap::new();
        let mut off = 0;
        for (i, (s, v)) in specs.iter().zip(values).enumerate() {
            if index.insert(s.name.clone(), i).is_some() {
                return Err(Error::Train(format!(
                    "parameter `{}` declared twice",
                    s.name
                )));
            }
            vars.push(Var::from_tensor(&Tensor::from_vec(
                v,
                s.shape.as_slice(),
                device,
            )?)?);
            offsets.push(off);
            off += s.numel();
        }
        offsets.push(off);
        Ok(ParamStore {
            device: device.clone(),
            specs,
            vars,
            offsets,
            index,
        })
    }

    /// The device the parameters live on.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters' specs, sorted by name (the flat layout's order).
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    /// `(offset, length)` of parameter `i` in the flat layout.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// Whether the store has a parameter `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor behind `name` (shares storage with the variable, so it sees updates).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        match self.index.get(name) {
            Some(&i) => Ok(self.vars[i].as_tensor().clone()),
            None => Err(Error::Train(format!("model has no parameter `{name}`"))),
        }
    }

    /// The variables, in the order of [`Self::specs`].
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Overwrites one parameter (shape-checked).
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| Error::Train(format!("model has no parameter `{name}`")))?;
        if value.dims() != self.specs[i].shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: self.specs[i].shape.clone(),
                found: value.dims().to_vec(),
            });
        }
        let v = value.to_dtype(DType::F32)?.to_device(&self.device)?;
        self.vars[i].set(&v)?;
        Ok(())
    }

    /// All parameters, concatenated in name order.
    pub fn to_flat(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.numel());
        for v in &self.vars {
            out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Copies a flat buffer (as from `to_flat`) back into the parameters: on the CPU
    /// straight into their storage (one copy, no temporary tensor: the host update's
    /// write-back each step), elsewhere through a tensor.
    pub fn set_from_flat(&self, flat: &[f32]) -> Result<()> {
        assert_eq!(flat.len(), self.numel(), "flat parameter buffer length");
        for (i, v) in self.vars.iter().enumerate() {
            let src = &flat[self.range(i)];
            if self.device.is_cpu() && v.is_contiguous() && v.dtype() == DType::F32 {
                v.as_tensor().inplace_op1(&CopyInto(src))?;
            } else {
                let t = Tensor::from_slice(src, self.specs[i].shape.as_slice(), &self.device)?;
                v.set(&t)?;
            }
        }
        Ok(())
    }

    /// Adds the gradients in `grads` into `flat` (same layout as `to_flat`). A parameter
    /// without a gradient is an error: it would leave a hole in every rank's buckets.
    pub fn accumulate_grads(&self, grads: &GradStore, flat: &mut [f32]) -> Result<()> {
        assert_eq!(flat.len(), self.numel(), "flat gradient buffer length");
        for i in 0..self.vars.len() {
            let g = self.grad_of(i, grads)?.flatten_all()?.to_vec1::<f32>()?;
            for (d, s) in flat[self.range(i)].iter_mut().zip(&g) {
                *d += s;
            }
        }
        Ok(())
    }

    /// All parameters, concatenated in name order, as one 1-D tensor on the store's device
    /// (the on-device counterpart of [`Self::to_flat`]).
    pub fn to_flat_tensor(&self) -> Result<Tensor> {
        let parts = self
            .vars
            .iter()
            .map(|v| v.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        flat_cat(&parts, &self.device)
    }

    /// Copies a flat tensor (as from [`Self::to_flat_tensor`]) back into the parameters,
    /// device to device.
    pub fn set_from_flat_tensor(&self, flat: &Tensor) -> Result<()> {
        assert_eq!(flat.dims(), [self.numel()], "flat parameter tensor shape");
        for (i, v) in self.vars.iter().enumerate() {
            let r = self.range(i);
            let t = flat
                .narrow(0, r.start, r.len())?
                .reshape(self.specs[i].shape.as_slice())?;
            v.set(&t)?;
        }
        Ok(())
    }

    /// The gradients in `grads` as one flat tensor on the store's device (same layout as
    /// [`Self::to_flat_tensor`]); a parameter without a gradient is an error, as in
    /// [`Self::accumulate_grads`].
    pub fn flat_grads(&self, grads: &GradStore) -> Result<Tensor> {
        let parts = (0..self.vars.len())
            .map(|i| Ok(self.grad_of(i, grads)?.flatten_all()?))
            .collect::<Result<Vec<_>>>()?;
        flat_cat(&parts, &self.device)
    }

    /// Parameter `i`'s gradient in `grads`; none is an error (it would leave a hole in every
    /// rank's buckets).
    fn grad_of<'g>(&self, i: usize, grads: &'g GradStore) -> Result<&'g Tensor> {
        grads.get(self.vars[i].as_tensor()).ok_or_else(|| {
            Error::Train(format!(
                "parameter `{}` received no gradient: it is not used by this model's loss",
                self.specs[i].name
            ))
        })
    }

    /// name → tensor, for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.specs
            .iter()
            .zip(&self.vars)
            .map(|(s, v)| (s.name.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// A hash of every parameter's bits, in name order: equal on ranks that are in sync.
    pub fn fingerprint(&self) -> Result<u64> {
        let mut h = 0u64;
        for (s, v) in self.specs.iter().zip(&self.vars) {
            let data = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            h = util::mix_seed(&[h, util::fnv1a(s.name.as_bytes()), util::fnv1a(&bytes)]);
        }
        Ok(h)
    }

    /// Re-initialises parameter `name` as `init` would (for heads a checkpoint lacks).
    pub fn reinit(&self, name: &str, std: f32, seed: u64) -> Result<()> {
        let i = self.index[name];
        let v = init_values(&self.specs[i], std, seed);
        self.set(
            name,
            &Tensor::from_vec(v, self.specs[i].shape.as_slice(), &self.device)?,
        )
    }
}

/// `parts` concatenated into one 1-D tensor (an empty store gives an empty tensor).
fn flat_cat(parts: &[Tensor], device: &Device) -> Result<Tensor> {
    if parts.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, device)?);
    }
    Ok(Tensor::cat(parts, 0)?)
}

fn init_values(s: &ParamSpec, std: f32, seed: u64) -> Vec<f32> {
    let n = s.numel();
    match s.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal | Init::NormalPadRow(_) => {
            let mut rng = util::rng(&[seed, util::fnv1a(s.name.as_bytes())]);
            let dist = Normal::new(0.0f32, std).expect("initializer_range is finite");
            let mut v: Vec<f32> = (0..n).map(|_| dist.sample(&mut rng)).collect();
            if let Init::NormalPadRow(pad) = s.init {
                let w = s.shape[1];
                v[pad * w..(pad + 1) * w].iter_mut().for_each(|x| *x = 0.0);
            }
            v
        }
    }
}

/// Writes a slice over a contiguous f32 CPU tensor's elements, in place.
struct CopyInto<'a>(&'a [f32]);

impl candle_core::InplaceOp1 for CopyInto<'_> {
    fn name(&self) -> &'static str {
        "copy-into"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(dst) = storage else {
            candle_core::bail!("copy-into: an f32 tensor was expected");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("copy-into: a contiguous tensor was expected");
        };
        if end - start != self.0.len() {
            candle_core::bail!("copy-into: {} elements into {}", self.0.len(), end - start);
        }
        dst[start..end].copy_from_slice(self.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("b.weight", &[3, 2], Init::NormalPadRow(0)),
            ParamSpec::new("a.LayerNorm.weight", &[2], Init::Ones),
            ParamSpec::new("a.bias", &[2], Init::Zeros),
        ]
    }

    #[test]
    fn sorted_seeded_and_flat_round_trip() {
        let s1 = ParamStore::init(specs(), 0.02, 7, &Device::Cpu).unwrap();
        let names: Vec<_> = s1.specs().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a.LayerNorm.weight", "a.bias", "b.weight"]);
        let flat = s1.to_flat().unwrap();
        assert_eq!(&flat[..4], &[1.0, 1.0, 0.0, 0.0]);
        assert_eq!(&flat[4..6], &[0.0, 0.0], "padding row is zero");
        assert!(flat[6..].iter().all(|v| *v != 0.0 && v.abs() < 0.2));
        let s2 = ParamStore::init(specs(), 0.02, 7, &Device::Cpu).unwrap();
        assert_eq!(s1.fingerprint().unwrap(), s2.fingerprint().unwrap());
        let s3 = ParamStore::init(specs(), 0.02, 8, &Device::Cpu).unwrap();
        assert_ne!(s1.fingerprint().unwrap(), s3.fingerprint().unwrap());
        let doubled: Vec<f32> = flat.iter().map(|v| v * 2.0).collect();
        s1.set_from_flat(&doubled).unwrap();
        assert_eq!(s1.to_flat().unwrap(), doubled);
    }

    #[test]
    fn decay_excludes_biases_and_layer_norm() {
        let d: Vec<bool> = specs().iter().map(|s| s.decays()).collect();
        assert_eq!(d, [true, false, false]);
    }

    #[test]
    fn missing_gradient_is_named() {
        let s = ParamStore::init(specs(), 0.02, 7, &Device::Cpu).unwrap();
        let loss = s.get("b.weight").unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut flat = vec![0.0; s.numel()];
        let e = s
            .accumulate_grads(&grads, &mut flat)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.LayerNorm.weight"), "{e}");
    }
}
