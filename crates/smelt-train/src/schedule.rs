//! Learning-rate schedules: linear warm-up, then linear or cosine decay, or constant.

/// Shape of the decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Linear,
    Cosine,
    Constant,
}

impl std::str::FromStr for Decay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Decay::Linear),
            "cosine" => Ok(Decay::Cosine),
            "constant" => Ok(Decay::Constant),
            other => Err(format!(
                "unknown schedule `{other}`: expected linear, cosine or constant"
            )),
        }
    }
}

/// The learning rate of each optimizer step, as Hugging Face's
/// `get_{linear,cosine}_schedule_with_warmup`: update `k` (from 0) uses `base * f(k)`.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_steps;
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => (1.0 - progress).max(0.0),
            Decay::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_decay_to_zero() {
        let s = Schedule {
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Linear,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(110), 0.0);
        assert_eq!(s.lr(500), 0.0);
    }

    #[test]
    fn cosine_is_half_way_at_the_middle() {
        let s = Schedule {
            base_lr: 2.0,
            warmup_steps: 0,
            total_steps: 100,
            decay: Decay::Cosine,
        };
        assert!((s.lr(0) - 2.0).abs() < 1e-12);
        assert!((s.lr(50) - 1.0).abs() < 1e-9);
        assert!(s.lr(100).abs() < 1e-12);
    }
}
