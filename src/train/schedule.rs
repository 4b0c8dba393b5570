//! Learning-rate schedules: linear warm-up, then linear or cosine decay to zero (as HF's
//! `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup`), or constant.

use serde::{Deserialize, Serialize};

/// How the learning rate falls after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Linearly to zero at `total_steps`.
    Linear,
    /// Along half a cosine to zero at `total_steps`.
    Cosine,
    /// Not at all: `peak_lr` until the end.
    Constant,
}

/// A learning-rate schedule: warm-up to `peak_lr`, then `decay`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The learning rate at the end of warm-up.
    pub peak_lr: f32,
    /// Steps of linear warm-up from zero.
    pub warmup_steps: u64,
    /// Steps of the whole schedule, warm-up included.
    pub total_steps: u64,
    /// What follows the warm-up.
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate for optimiser step `step` (0-based: the first update uses `lr(0)`).
    pub fn lr(&self, step: u64) -> f32 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let f = if step < self.warmup_steps {
            s / w.max(1.0)
        } else {
            let progress = ((s - w) / (t - w).max(1.0)).clamp(0.0, 1.0);
            match self.decay {
                Decay::Constant => 1.0,
                Decay::Linear => 1.0 - progress,
                Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            }
        };
        (self.peak_lr as f64 * f) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            peak_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Linear,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-6);
        assert_eq!(s.lr(10), 1.0);
        assert!((s.lr(60) - 0.5).abs() < 1e-6);
        assert_eq!(s.lr(110), 0.0);
        assert_eq!(s.lr(500), 0.0);
        let c = Schedule {
            decay: Decay::Cosine,
            ..s
        };
        assert!((c.lr(60) - 0.5).abs() < 1e-6);
        assert!((c.lr(35) - 0.853_553_4).abs() < 1e-5);
        let k = Schedule {
            decay: Decay::Constant,
            ..s
        };
        assert_eq!(k.lr(100), 1.0);
    }
}
