//! LoRA finetuning of the UNet and optionally the text encoders
//! (`orchestrate finetune`), with the semantics of diffusers'
//! `examples/text_to_image/train_text_to_image_lora.py` (SD 1.x/2.x) and
//! `train_text_to_image_lora_sdxl.py` (SDXL: both encoders' penultimate
//! states and text_encoder_2's pooled embedding, `add_time_ids` from each
//! example's original size and crop, the VAE in float32):
//!
//! - a LoRA (peft's `LoraLayer`, dropout 0) on every attention projection
//!   `to_q`, `to_k`, `to_v`, `to_out.0`: `y = W x + alpha/rank · B(A x)`,
//!   A drawn as peft's `init_lora_weights="gaussian"` (normal, std 1/rank),
//!   B zero; with `--train-text-encoder` also on every text encoder's
//!   `q_proj`, `k_proj`, `v_proj`, `out_proj` (the SDXL script's
//!   `--train_text_encoder`; the prompt embeddings are then recomputed with
//!   gradients every step);
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

use crate::diffusion::clip::{ClipTextConfig, ClipTextModel};
use crate::diffusion::model_dir::Family;
use crate::diffusion::pipeline::{added_cond_rows, encode_with, StableDiffusion};
use crate::diffusion::schedulers::config::SchedulerConfig;
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::{AddedCond, Timesteps, UNet2DConditionModel, UNetConfig};
use crate::error::{Error, Result};
use crate::rahf::train::optim::AdamW;
use crate::weights::Weights;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The UNet projections a LoRA is put on, as diffusers' scripts target them.
pub const TARGETS: [&str; 4] = ["to_k", "to_q", "to_v", "to_out.0"];

/// The text-encoder projections (the SDXL script's `--train_text_encoder`).
pub const TEXT_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

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

/// The LoRA of one component (`unet`, `text_encoder`, `text_encoder_2`):
/// fp32 leaves by module name.
pub struct PartLora {
    /// The component, the prefix of its keys in the saved file.
    pub component: String,
    pub rank: i64,
    pub alpha: f64,
    /// Module name in the component's weights (`down_blocks.0.….to_q`,
    /// `encoder.layers.0.self_attn.q_proj`) → (A [rank, in], B [out, rank]),
    /// sorted by name.
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

/// The UNet's LoRA (a [`PartLora`] of component `unet`).
pub type UnetLora = PartLora;

impl PartLora {
    /// The modules of `unet` (its weights' names) that get a LoRA: every
    /// attention projection named in [`TARGETS`], with (in, out) widths.
    pub fn targets(unet: &Weights) -> Vec<(String, i64, i64)> {
        Self::find(unet, &TARGETS, |m| m.contains(".attn1.") || m.contains(".attn2."))
    }

    /// The modules of a CLIP text encoder's weights that get a LoRA: the
    /// self-attention projections named in [`TEXT_TARGETS`].
    pub fn text_targets(encoder: &Weights) -> Vec<(String, i64, i64)> {
        Self::find(encoder, &TEXT_TARGETS, |m| m.contains(".self_attn."))
    }

    fn find(weights: &Weights, targets: &[&str], place: impl Fn(&str) -> bool) -> Vec<(String, i64, i64)> {
        let mut out: Vec<(String, i64, i64)> = weights
            .named_tensors()
            .into_iter()
            .filter_map(|(name, t)| {
                let module = name.strip_suffix(".weight")?;
                let target = targets.iter().any(|p| module.ends_with(&format!(".{p}")));
                (place(module) && target && t.dim() == 2).then(|| (module.to_string(), t.size()[1], t.size()[0]))
            })
            .collect();
        out.sort();
        out
    }

    /// A fresh UNet LoRA: A normal with std 1/rank (peft's "gaussian"), B
    /// zero, drawn in module-name order from a CPU generator seeded with `seed`.
    pub fn init(unet: &Weights, rank: i64, alpha: f64, seed: u64, device: Device) -> Result<Self> {
        let targets = Self::targets(unet);
        if targets.is_empty() {
            return Err(Error::Invalid(format!("{}: no attention projections (to_q, to_k, to_v, to_out.0) to put a LoRA on", unet.source())));
        }
        Self::init_modules("unet", &targets, rank, alpha, seed, device)
    }

    /// A fresh LoRA on text encoder `component`'s projections, drawn as [`Self::init`].
    pub fn init_text_encoder(component: &str, encoder: &Weights, rank: i64, alpha: f64, seed: u64, device: Device) -> Result<Self> {
        let targets = Self::text_targets(encoder);
        if targets.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no self-attention projections (q_proj, k_proj, v_proj, out_proj) to put a LoRA on",
                encoder.source()
            )));
        }
        Self::init_modules(component, &targets, rank, alpha, seed, device)
    }

    fn init_modules(component: &str, targets: &[(String, i64, i64)], rank: i64, alpha: f64, seed: u64, device: Device) -> Result<Self> {
        if rank < 1 {
            return Err(Error::Invalid(format!("--rank {rank}: must be at least 1")));
        }
        if !(alpha > 0.0 && alpha.is_finite()) {
            return Err(Error::Invalid(format!("--alpha {alpha}: must be a positive number")));
        }
        let mut modules = BTreeMap::new();
        crate::diffusion::noise::with_seed(seed, |g| {
            for (name, in_dim, out_dim) in targets {
                let a = g.randn(&[rank, *in_dim], Kind::Float) * (1.0 / rank as f64);
                let a = a.to_device(device).set_requires_grad(true);
                let b = Tensor::zeros([*out_dim, rank], (Kind::Float, device)).set_requires_grad(true);
                modules.insert(name.clone(), (a, b));
            }
        });
        Ok(PartLora { component: component.to_string(), rank, alpha, modules })
    }

    /// The parameters in diffusers' key names (`unet.MODULE.lora_A.weight`,
    /// `….lora_B.weight`, `text_encoder.MODULE.…`): what the optimizer,
    /// checkpoints and the saved file use. A module is named as in its
    /// component's weights, as peft names it on the model transformers builds
    /// from them (a text encoder's `text_model.` prefix or not; diffusers
    /// strips the prefix where the model has no such attribute).
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.modules.len() * 2);
        for (name, (a, b)) in &self.modules {
            let key = format!("{}.{name}", self.component);
            out.push((format!("{key}.lora_A.weight"), a.shallow_clone()));
            out.push((format!("{key}.lora_B.weight"), b.shallow_clone()));
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
    /// the file's `lora_adapter_metadata`, keys prefixed with the component.
    pub fn adapter_metadata_entries(&self) -> serde_json::Map<String, serde_json::Value> {
        // An integral alpha as peft's config holds it when given an int.
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            serde_json::json!(self.alpha as i64)
        } else {
            serde_json::json!(self.alpha)
        };
        let targets: &[&str] = if self.component == "unet" { &TARGETS } else { &TEXT_TARGETS };
        let c = &self.component;
        let mut m = serde_json::Map::new();
        m.insert(format!("{c}.init_lora_weights"), serde_json::json!("gaussian"));
        m.insert(format!("{c}.lora_alpha"), alpha);
        m.insert(format!("{c}.r"), serde_json::json!(self.rank));
        m.insert(format!("{c}.target_modules"), serde_json::json!(targets));
        m
    }

    /// [`Self::adapter_metadata_entries`] as the file's JSON text.
    pub fn adapter_metadata(&self) -> String {
        adapter_metadata(&[self])
    }

    /// `base` with this LoRA beside its modules (`NAME.lora_A.weight`,
    /// `.lora_B.weight`, `.alpha`: what [`crate::nn::Projection`] trains),
    /// cast to the compute dtype (in bf16 the casts lead the gradients back
    /// to the fp32 LoRA; in fp32 they are the LoRA tensors themselves).
    fn beside(&self, base: &HashMap<String, Tensor>, kind: Kind, device: Device) -> HashMap<String, Tensor> {
        let mut tensors: HashMap<String, Tensor> = base.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        for (name, (a, b)) in &self.modules {
            tensors.insert(format!("{name}.lora_A.weight"), a.to_kind(kind));
            tensors.insert(format!("{name}.lora_B.weight"), b.to_kind(kind));
            tensors.insert(format!("{name}.alpha"), Tensor::from(self.alpha).to_device(device));
        }
        tensors
    }
}

/// The JSON of several parts' adapter metadata (sorted keys, as Python's `json.dumps(..., sort_keys=True)`).
fn adapter_metadata(parts: &[&PartLora]) -> String {
    let mut all = serde_json::Map::new();
    for p in parts {
        all.extend(p.adapter_metadata_entries());
    }
    serde_json::to_string_pretty(&serde_json::Value::Object(all)).expect("serialises")
}

/// Everything trained: the UNet's LoRA and, with `--train-text-encoder`,
/// one per text encoder (in the pipeline's order).
pub struct Loras {
    pub unet: PartLora,
    pub text: Vec<PartLora>,
}

impl Loras {
    pub fn parts(&self) -> Vec<&PartLora> {
        std::iter::once(&self.unet).chain(&self.text).collect()
    }

    /// Every part's [`PartLora::named_params`].
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        self.parts().into_iter().flat_map(|p| p.named_params()).collect()
    }

    pub fn load_values(&self, source: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.parts().into_iter().try_for_each(|p| p.load_values(source, tensors))
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
    /// The model for one step: base weights plus the LoRA.
    pub fn model(&self, lora: &UnetLora) -> Result<UNet2DConditionModel> {
        let tensors = lora.beside(&self.base, self.kind, self.device);
        // `from_tensors` casts floating tensors to `kind` (a no-op for all but alpha).
        let w = Weights::from_tensors(self.source.clone(), tensors, self.device, self.kind);
        UNet2DConditionModel::load(w.root(), self.config.clone())
    }
}

/// A text encoder being trained: its config and frozen base weights.
pub struct TrainText {
    pub config: ClipTextConfig,
    pub base: HashMap<String, Tensor>,
    pub source: String,
    pub kind: Kind,
    pub device: Device,
}

impl TrainText {
    /// Loads text encoder `index` of `pipe` afresh (its weights in the
    /// pipeline's dtype); the pipeline's own copy stays frozen.
    pub fn load(pipe: &StableDiffusion, index: usize) -> Result<Self> {
        let t = &pipe.text_encoders[index];
        let w = Weights::load(&pipe.dir.weights(&t.component)?, pipe.device, pipe.kind)?;
        Ok(TrainText {
            config: t.model.config.clone(),
            base: w.named_tensors().into_iter().collect(),
            source: w.source().to_string(),
            kind: pipe.kind,
            device: pipe.device,
        })
    }

    /// The frozen base weights (what [`PartLora::init_text_encoder`] finds its modules in).
    pub fn weights(&self) -> Weights {
        let base = self.base.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        Weights::from_tensors(self.source.clone(), base, self.device, self.kind)
    }

    /// The model for one step: base weights plus the LoRA.
    pub fn model(&self, lora: &PartLora) -> Result<ClipTextModel> {
        let tensors = lora.beside(&self.base, self.kind, self.device);
        let w = Weights::from_tensors(self.source.clone(), tensors, self.device, self.kind);
        ClipTextModel::load(w.root(), self.config.clone())
    }
}

/// What a step trains and conditions on.
pub struct Trainee<'a> {
    /// The pipeline: its family, tokenizers and (frozen) text encoders.
    pub pipe: &'a StableDiffusion,
    pub unet: &'a TrainUnet,
    /// With `--train-text-encoder`, one per pipeline text encoder (rebuilt
    /// each step with its LoRA); empty: the pipeline's, without gradients.
    pub text: &'a [TrainText],
}

impl Trainee<'_> {
    /// The UNet's conditioning for `captions`: the prompt embeddings (through
    /// the text encoders' LoRA when they are trained) and, for SDXL, the
    /// pooled embedding with each example's time ids.
    fn conditioning(&self, loras: &Loras, captions: &[String], time_ids: &[Vec<f64>]) -> Result<(Tensor, Option<AddedCond>)> {
        let pipe = self.pipe;
        let embeds = if self.text.is_empty() {
            pipe.encode_prompts(captions, None)?
        } else {
            let models = self.text.iter().zip(&loras.text).map(|(t, l)| t.model(l)).collect::<Result<Vec<_>>>()?;
            let encoders: Vec<(&ClipTokenizer, &ClipTextModel)> =
                pipe.text_encoders.iter().map(|t| &t.tokenizer).zip(&models).collect();
            encode_with(pipe.family, &encoders, captions, None, pipe.device)?
        };
        let added = match pipe.family {
            Family::Sd => None,
            Family::Xl(_) => {
                let pooled = embeds.pooled.as_ref().ok_or_else(|| {
                    Error::Invalid(format!("{}: SDXL without a pooled text embedding", pipe.checkpoint.display()))
                })?;
                if time_ids.len() as i64 != pooled.size()[0] {
                    return Err(Error::Invalid(format!("{} time-id rows for {} captions", time_ids.len(), captions.len())));
                }
                Some(added_cond_rows(pooled, time_ids, pipe.kind, pipe.device))
            }
        };
        Ok((embeds.embeds, added))
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
    /// The B captions.
    pub captions: &'a [String],
    /// SDXL: each example's `add_time_ids`
    /// ([`crate::diffusion::pipeline::add_time_ids`]); empty for SD.
    pub time_ids: &'a [Vec<f64>],
}

/// The loss of one micro-batch (a 0-d float32 tensor with a graph to the
/// LoRA) given its conditioning: the script's, line for line.
pub fn loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    settings: &LossSettings,
    x: &StepInputs,
    encoder_hidden_states: &Tensor,
    added: Option<&AddedCond>,
) -> Tensor {
    let device = x.latents.device();
    let (a, s) = schedule.coefficients(x.timesteps, device);
    let noisy = &a * x.latents + &s * x.noise;
    let target = match settings.prediction {
        Prediction::Epsilon => x.noise.shallow_clone(),
        Prediction::VPrediction => &a * x.noise - &s * x.latents,
    };
    let pred = unet.forward_timesteps(&noisy, &Timesteps::PerSample(x.timesteps.shallow_clone()), encoder_hidden_states, added);
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
    trainee: &Trainee,
    loras: &Loras,
    opt: &mut AdamW,
    schedule: &NoiseSchedule,
    settings: &LossSettings,
    micro: &[StepInputs],
    lr: f64,
) -> Result<(f64, f64)> {
    opt.zero_grad();
    let model = trainee.unet.model(&loras.unet)?;
    let n = micro.len() as f64;
    let mut total = 0.0;
    for x in micro {
        let (states, added) = trainee.conditioning(loras, x.captions, x.time_ids)?;
        let l = loss(&model, schedule, settings, x, &states, added.as_ref());
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

/// Writes the LoRAs as diffusers' `save_lora_weights` does: float32 tensors
/// named `unet.MODULE.lora_A.weight` / `.lora_B.weight` (and
/// `text_encoder.…`, `text_encoder_2.…`), metadata `format: pt` and
/// `lora_adapter_metadata` (rank, alpha, targets per component), so
/// `pipe.load_lora_weights(...)` loads it unchanged. Atomic (`.partial` + rename).
pub fn save_diffusers_loras(path: &Path, parts: &[&PartLora]) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = parts
        .iter()
        .flat_map(|p| p.named_params())
        .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous()))
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), adapter_metadata(parts)),
    ]);
    crate::weights::write_safetensors_with_metadata(path, &tensors, &metadata)
}

/// [`save_diffusers_loras`] of the UNet's LoRA alone.
pub fn save_diffusers_lora(path: &Path, lora: &UnetLora) -> Result<()> {
    save_diffusers_loras(path, &[lora])
}
