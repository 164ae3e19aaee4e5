//! AdamW (decoupled weight decay, Loshchilov & Hutter), written out so that its
//! whole state (moments and step) can be saved and a resumed run continues
//! bit-for-bit; tch's optimizers keep their state out of reach.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip before the update; `None` = no clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// PyTorch's AdamW defaults; the paper gives none of these.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: Some(1.0) }
    }
}

/// Learning rate at (1-based) step `t`: linear from 0 to `base` over `warmup`
/// steps, then `base * sqrt(warmup / t)` (Supp. §9: 0.015, 2000 steps).
pub fn learning_rate(base: f64, warmup: u64, t: u64) -> f64 {
    let t = t.max(1) as f64;
    if warmup == 0 {
        return base / t.sqrt();
    }
    let w = warmup as f64;
    if t <= w {
        base * t / w
    } else {
        base * (w / t).sqrt()
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Parameters, by checkpoint name, in a fixed (sorted) order.
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Updates done so far.
    pub step: u64,
}

impl AdamW {
    /// `params` must be fp32 leaves with `requires_grad`.
    pub fn new(mut params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let exp_avg = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| p.zeros_like()).collect();
        AdamW { config, params, exp_avg, exp_avg_sq, step: 0 }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// The global L2 norm of the gradients (parameters without a gradient count as 0).
    pub fn grad_norm(&self) -> f64 {
        let _guard = tch::no_grad_guard();
        let mut total = 0f64;
        for (_, p) in &self.params {
            let g = p.grad();
            if g.defined() {
                total += g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
            }
        }
        total.sqrt()
    }

    /// One update at learning rate `lr`; returns the gradient norm before clipping.
    pub fn step(&mut self, lr: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let norm = self.grad_norm();
        let clip = match self.config.max_grad_norm {
            Some(max) if norm > max && norm.is_finite() => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (i, (_, p)) in self.params.iter_mut().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let g = if clip != 1.0 { &g * clip } else { g };
            let m = &mut self.exp_avg[i];
            let v = &mut self.exp_avg_sq[i];
            // Same arithmetic order as torch.optim.AdamW (single-tensor path).
            let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            let _ = m.lerp_(&g, 1.0 - c.beta1);
            let _ = v.g_mul_scalar_(c.beta2).addcmul_(&g, &g.g_mul_scalar(1.0 - c.beta2));
            let denom = v.sqrt() / bias2_sqrt + c.eps;
            let _ = p.addcdiv_(&*m, &denom.g_mul_scalar(-bias1 / lr));
        }
        norm
    }

    /// Moments by name (`exp_avg.<param>`, `exp_avg_sq.<param>`), for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("exp_avg.{name}"), self.exp_avg[i].shallow_clone()));
            out.push((format!("exp_avg_sq.{name}"), self.exp_avg_sq[i].shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`]; every parameter must be there
    /// with its shape, or the resumed run would silently differ.
    pub fn load_state(&mut self, source: &str, state: &std::collections::HashMap<String, Tensor>, step: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, dst) in [("exp_avg", &mut self.exp_avg[i]), ("exp_avg_sq", &mut self.exp_avg_sq[i])] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| Error::TensorMissing { file: source.into(), name: key.clone() })?;
                if t.size() != p.size() {
                    return Err(Error::TensorShape { file: source.into(), name: key, expected: p.size(), found: t.size() });
                }
                dst.copy_(&t.to_device(p.device()).to_kind(p.kind()));
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert_eq!(learning_rate(0.015, 2000, 1), 0.015 / 2000.0);
        assert!((learning_rate(0.015, 2000, 2000) - 0.015).abs() < 1e-15);
        assert!((learning_rate(0.015, 2000, 8000) - 0.0075).abs() < 1e-12);
        assert!(learning_rate(0.015, 2000, 20000) < learning_rate(0.015, 2000, 10000));
    }

    /// Hand-computed AdamW steps on one scalar (the formula of Loshchilov & Hutter
    /// with PyTorch's bias correction), decay included.
    #[test]
    fn adamw_matches_formula() {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, max_grad_norm: None };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        let (mut x, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=3 {
            opt.zero_grad();
            let loss = (&p * &p * 3.0).sum(Kind::Float); // grad 6p
            loss.backward();
            let g = 6.0 * x;
            let lr = 0.01;
            opt.step(lr);
            x *= 1.0 - lr * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.99 * v + 0.01 * g * g;
            let mh = m / (1.0 - 0.9f64.powi(t));
            let vh = v / (1.0 - 0.99f64.powi(t));
            x -= lr * mh / (vh.sqrt() + 1e-8);
            assert!((p.double_value(&[0]) - x).abs() < 1e-6, "step {t}: {} vs {x}", p.double_value(&[0]));
        }
    }

    #[test]
    fn clipping_scales_the_gradient() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let cfg = AdamWConfig { max_grad_norm: Some(1.0), weight_decay: 0.0, ..Default::default() };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        (&p * &p * 0.5).sum(Kind::Float).backward(); // grad = p, norm 5
        assert!((opt.grad_norm() - 5.0).abs() < 1e-6);
        let n = opt.step(0.1);
        assert!((n - 5.0).abs() < 1e-6);
        // First Adam step moves each coordinate by ~lr whatever the scale.
        assert!((p.double_value(&[0]) - 2.9).abs() < 1e-4);
    }
}
