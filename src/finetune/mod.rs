//! LoRA finetuning of the UNet (`orchestrate finetune`), with the semantics of
//! diffusers' `examples/text_to_image/train_text_to_image_lora.py`:
//!
//! - a LoRA (peft's `LoraLayer`, dropout 0) on every attention projection
//!   `to_q`, `to_k`, `to_v`, `to_out.0`: `y = W x + alpha/rank · B(A x)`,
//!   A drawn as peft's `init_lora_weights="gaussian"` (normal, std 1/rank),
//!   B zero;
//! - the loss: VAE `latent_dist.sample()` × scaling_factor, DDPM `add_noise`
//!   at uniform integer timesteps, MSE of the UNet's prediction against the
//!   noise (or v), optionally Min-SNR-γ weighted;
//! - `clip_grad_norm_(max_grad_norm)`, AdamW (torch's, in fp32; the RAHF
//!   trainer's [`AdamW`]), the schedules of diffusers' `get_scheduler`.
//!
//! [`train_step`] is one step on given tensors (what the parity test feeds
//! with the reference's); [`run`] is the CLI's loop (data, its own seeded
//! randomness, checkpoints, resume). The result is written as diffusers'
//! `save_lora_weights` writes it ([`save_diffusers_lora`]).
pub mod data;
pub mod run;

use crate::diffusion::schedulers::config::SchedulerConfig;
use crate::diffusion::unet::{Timesteps, UNet2DConditionModel, UNetConfig};
use crate::error::{Error, Result};
use crate::rahf::train::optim::AdamW;
use crate::weights::Weights;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The projections a LoRA is put on, as diffusers' script targets them.
pub const TARGETS: [&str; 4] = ["to_k", "to_q", "to_v", "to_out.0"];

/// What the loss predicts (the scheduler's `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

impl Prediction {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            _ => Err(Error::Invalid(format!("prediction type `{s}`: expected epsilon or v_prediction"))),
        }
    }
}

/// The UNet's LoRA: fp32 leaves by module name (`down_blocks.0.….to_q`).
pub struct UnetLora {
    pub rank: i64,
    pub alpha: f64,
    /// Module name → (A [rank, in], B [out, rank]), sorted by name.
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl UnetLora {
    /// The modules of `unet` (its weights' names) that get a LoRA: every
    /// attention projection named in [`TARGETS`], with (in, out) widths.
    pub fn targets(unet: &Weights) -> Vec<(String, i64, i64)> {
        let mut out: Vec<(String, i64, i64)> = unet
            .named_tensors()
            .into_iter()
            .filter_map(|(name, t)| {
                let module = name.strip_suffix(".weight")?;
                let attn = module.contains(".attn1.") || module.contains(".attn2.");
                let target = TARGETS.iter().any(|p| module.ends_with(&format!(".{p}")));
                (attn && target && t.dim() == 2).then(|| (module.to_string(), t.size()[1], t.size()[0]))
            })
            .collect();
        out.sort();
        out
    }

    /// A fresh LoRA: A normal with std 1/rank (peft's "gaussian"), B zero,
    /// drawn in module-name order from a CPU generator seeded with `seed`.
    pub fn init(unet: &Weights, rank: i64, alpha: f64, seed: u64, device: Device) -> Result<Self> {
        if rank < 1 {
            return Err(Error::Invalid(format!("--rank {rank}: must be at least 1")));
        }
        if !(alpha > 0.0 && alpha.is_finite()) {
            return Err(Error::Invalid(format!("--alpha {alpha}: must be a positive number")));
        }
        let targets = Self::targets(unet);
        if targets.is_empty() {
            return Err(Error::Invalid(format!("{}: no attention projections (to_q, to_k, to_v, to_out.0) to put a LoRA on", unet.source())));
        }
        let mut modules = BTreeMap::new();
        crate::diffusion::noise::with_seed(seed, |g| {
            for (name, in_dim, out_dim) in &targets {
                let a = g.randn(&[rank, *in_dim], Kind::Float) * (1.0 / rank as f64);
                let a = a.to_device(device).set_requires_grad(true);
                let b = Tensor::zeros([*out_dim, rank], (Kind::Float, device)).set_requires_grad(true);
                modules.insert(name.clone(), (a, b));
            }
        });
        Ok(UnetLora { rank, alpha, modules })
    }

    /// The parameters in diffusers' key names (`unet.MODULE.lora_A.weight`,
    /// `….lora_B.weight`): what the optimizer, checkpoints and the saved file use.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.modules.len() * 2);
        for (name, (a, b)) in &self.modules {
            out.push((format!("unet.{name}.lora_A.weight"), a.shallow_clone()));
            out.push((format!("unet.{name}.lora_B.weight"), b.shallow_clone()));
        }
        out
    }

    /// Replaces the values (not the tensors: the optimizer holds them) by those
    /// of `tensors` (diffusers' names); every parameter must be there, shaped.
    pub fn load_values(&self, source: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (key, mut p) in self.named_params() {
            let t = tensors.get(&key).ok_or_else(|| Error::TensorMissing { file: source.into(), name: key.clone() })?;
            if t.size() != p.size() {
                return Err(Error::TensorShape { file: source.into(), name: key, expected: p.size(), found: t.size() });
            }
            p.copy_(&t.to_kind(Kind::Float));
        }
        Ok(())
    }

    /// peft's adapter config as diffusers' `save_lora_weights` records it in
    /// the file's `lora_adapter_metadata` (keys prefixed with `unet.`).
    pub fn adapter_metadata(&self) -> String {
        // An integral alpha as peft's config holds it when given an int.
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            serde_json::json!(self.alpha as i64)
        } else {
            serde_json::json!(self.alpha)
        };
        let meta = serde_json::json!({
            "unet.init_lora_weights": "gaussian",
            "unet.lora_alpha": alpha,
            "unet.r": self.rank,
            "unet.target_modules": TARGETS,
        });
        serde_json::to_string_pretty(&meta).expect("serialises")
    }
}

/// The UNet being trained: its frozen base weights and the LoRA.
pub struct TrainUnet {
    pub config: UNetConfig,
    /// Base weights in the compute dtype, by name.
    pub base: HashMap<String, Tensor>,
    pub source: String,
    pub kind: Kind,
    pub device: Device,
}

impl TrainUnet {
    /// The model for one step: base weights plus the LoRA cast to the
    /// compute dtype (in bf16 the casts lead the gradients back to the fp32
    /// LoRA; in fp32 they are the LoRA tensors themselves).
    pub fn model(&self, lora: &UnetLora) -> Result<UNet2DConditionModel> {
        let mut tensors: HashMap<String, Tensor> = self.base.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        for (name, (a, b)) in &lora.modules {
            tensors.insert(format!("{name}.lora_A.weight"), a.to_kind(self.kind));
            tensors.insert(format!("{name}.lora_B.weight"), b.to_kind(self.kind));
            tensors.insert(format!("{name}.alpha"), Tensor::from(lora.alpha).to_device(self.device));
        }
        // `from_tensors` casts floating tensors to `kind` (a no-op for all but alpha).
        let w = Weights::from_tensors(self.source.clone(), tensors, self.device, self.kind);
        UNet2DConditionModel::load(w.root(), self.config.clone())
    }
}

/// The noise schedule the loss uses: DDPM's ᾱ, float32 as diffusers'.
pub struct NoiseSchedule {
    pub alphas_cumprod: Tensor,
    pub num_train_timesteps: i64,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps.unwrap_or(1000);
        let ac = crate::diffusion::schedulers::schedule::alphas_cumprod(config, n, false)?;
        Ok(NoiseSchedule { alphas_cumprod: Tensor::from_slice(&ac), num_train_timesteps: n as i64 })
    }

    /// (sqrt ᾱ_t, sqrt(1-ᾱ_t)) as [B, 1, 1, 1], as DDPM's `add_noise` computes them.
    fn coefficients(&self, timesteps: &Tensor, device: Device) -> (Tensor, Tensor) {
        let ac = self.alphas_cumprod.to_device(device).index_select(0, &timesteps.to_device(device));
        let a = ac.sqrt().view([-1, 1, 1, 1]);
        let s = (ac.ones_like() - &ac).sqrt().view([-1, 1, 1, 1]);
        (a, s)
    }

    /// Min-SNR's `compute_snr`: (sqrt ᾱ / sqrt(1-ᾱ))², per timestep.
    fn snr(&self, timesteps: &Tensor, device: Device) -> Tensor {
        let ac = self.alphas_cumprod.to_device(device);
        let alpha = ac.sqrt().index_select(0, &timesteps.to_device(device));
        let sigma = (ac.ones_like() - &ac).sqrt().index_select(0, &timesteps.to_device(device));
        (alpha / sigma).square()
    }
}

/// Settings of the loss.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossSettings {
    pub prediction: Prediction,
    /// Min-SNR-γ weighting (`--snr-gamma`); None: plain MSE.
    pub snr_gamma: Option<f64>,
}

/// One micro-batch's inputs, as the reference script draws them.
pub struct StepInputs<'a> {
    /// VAE latents × scaling_factor, [B, C, h, w], float32.
    pub latents: &'a Tensor,
    /// [B, C, h, w] standard normal.
    pub noise: &'a Tensor,
    /// [B] int64 in [0, num_train_timesteps).
    pub timesteps: &'a Tensor,
    /// The text encoder's last hidden state, [B, L, D].
    pub encoder_hidden_states: &'a Tensor,
}

/// The loss of one micro-batch (a 0-d float32 tensor with a graph to the
/// LoRA): the script's, line for line.
pub fn loss(unet: &UNet2DConditionModel, schedule: &NoiseSchedule, settings: &LossSettings, x: &StepInputs) -> Tensor {
    let device = x.latents.device();
    let (a, s) = schedule.coefficients(x.timesteps, device);
    let noisy = &a * x.latents + &s * x.noise;
    let target = match settings.prediction {
        Prediction::Epsilon => x.noise.shallow_clone(),
        Prediction::VPrediction => &a * x.noise - &s * x.latents,
    };
    let pred = unet.forward_timesteps(&noisy, &Timesteps::PerSample(x.timesteps.shallow_clone()), x.encoder_hidden_states, None);
    let pred = pred.to_kind(Kind::Float);
    match settings.snr_gamma {
        None => pred.mse_loss(&target.to_kind(Kind::Float), tch::Reduction::Mean),
        Some(gamma) => {
            let snr = schedule.snr(x.timesteps, device);
            let capped = Tensor::stack(&[snr.shallow_clone(), snr.ones_like() * gamma], 1).min_dim(1, false).0;
            let w = match settings.prediction {
                Prediction::Epsilon => capped / &snr,
                Prediction::VPrediction => capped / (snr + 1.0),
            };
            let per = (pred - target.to_kind(Kind::Float)).square();
            let dims: Vec<i64> = (1..per.dim() as i64).collect();
            (per.mean_dim(dims.as_slice(), false, Kind::Float) * w).mean(Kind::Float)
        }
    }
}

/// One optimisation step over `micro` micro-batches (gradient accumulation:
/// each loss divided by their count, as accelerate does): backward, clip,
/// AdamW at `lr`. Returns (mean loss, gradient norm before clipping).
pub fn train_step(
    train: &TrainUnet,
    lora: &UnetLora,
    opt: &mut AdamW,
    schedule: &NoiseSchedule,
    settings: &LossSettings,
    micro: &[StepInputs],
    lr: f64,
) -> Result<(f64, f64)> {
    opt.zero_grad();
    let model = train.model(lora)?;
    let n = micro.len() as f64;
    let mut total = 0.0;
    for x in micro {
        let l = loss(&model, schedule, settings, x);
        total += l.double_value(&[]) / n;
        (l / n).backward();
    }
    if !total.is_finite() {
        return Err(Error::Invalid(format!("training diverged: loss is {total} (lr {lr:.3e})")));
    }
    let norm = opt.step(lr);
    Ok((total, norm))
}

/// diffusers' `get_scheduler` learning-rate multiplier at 0-based step `k`:
/// `constant`, `constant_with_warmup`, `linear` and `cosine` (both with warm-up).
pub fn lr_multiplier(schedule: &str, warmup: u64, total: u64, k: u64) -> Result<f64> {
    let (k, w, t) = (k as f64, warmup as f64, total as f64);
    let warm = |k: f64| k / w.max(1.0);
    Ok(match schedule {
        "constant" => 1.0,
        "constant_with_warmup" => {
            if k < w {
                warm(k)
            } else {
                1.0
            }
        }
        "linear" => {
            if k < w {
                warm(k)
            } else {
                ((t - k) / (t - w).max(1.0)).max(0.0)
            }
        }
        "cosine" => {
            if k < w {
                warm(k)
            } else {
                let progress = (k - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
        s => {
            return Err(Error::Invalid(format!(
                "--lr-scheduler `{s}`: expected constant, constant_with_warmup, linear or cosine"
            )))
        }
    })
}

/// Writes the LoRA as diffusers' `save_lora_weights` does: float32 tensors
/// named `unet.MODULE.lora_A.weight` / `.lora_B.weight`, metadata `format: pt`
/// and `lora_adapter_metadata` (rank, alpha, targets), so
/// `pipe.load_lora_weights(...)` loads it unchanged. Atomic (`.partial` + rename).
pub fn save_diffusers_lora(path: &Path, lora: &UnetLora) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = lora
        .named_params()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous()))
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), lora.adapter_metadata()),
    ]);
    crate::weights::write_safetensors_with_metadata(path, &tensors, &metadata)
}
