//! DPM-Solver++ (Lu et al. 2022), multistep, order 2 ("DPM++ 2M") or 1,
//! mirroring diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"`.
//!
//! The solver works on the data prediction x0 and the log-SNR
//! lambda = log(alpha_t / sigma_t). Its only state is the previous step's x0;
//! like diffusers, the first step taken (whatever its index, e.g. after an
//! img2img start) is first order.
use super::config::{FinalSigma, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{
    self, exp32, karras_sigmas, ln32, log_f32, np_interp_index, np_linspace, scalar, sigma_to_t, sqrt32, train_sigmas,
};
use super::{Scheduler, SchedulerKind};
use crate::error::Result;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub struct DpmSolverPP {
    timesteps: Vec<f64>,
    /// float32, one more than timesteps.
    sigmas: Vec<f32>,
    order: usize,
    solver: SolverType,
    prediction: PredictionType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    prev_x0: Option<Tensor>,
    lower_order_nums: usize,
    last_step: Option<usize>,
}

/// (alpha_t, sigma_t) of the variance-preserving process for a VE sigma.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / sqrt32(sigma * sigma + 1.0);
    (alpha, sigma * alpha)
}

fn lambda(alpha: f32, sigma: f32) -> f32 {
    ln32(alpha) - ln32(sigma)
}

impl DpmSolverPP {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        match config.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver++" => {}
            other => return Err(config.unsupported("algorithm_type", other)),
        }
        let order = config.solver_order.unwrap_or(2);
        if !(1..=2).contains(&order) {
            return Err(config.unsupported("solver_order", order));
        }
        let solver = match config.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the UniPC/DEIS solver names to midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(config.unsupported("solver_type", other)),
        };
        config.reject_true("thresholding", config.thresholding)?;
        config.reject_true("use_exponential_sigmas", config.use_exponential_sigmas)?;
        config.reject_true("use_beta_sigmas", config.use_beta_sigmas)?;
        config.reject_true("use_lu_lambdas", config.use_lu_lambdas)?;
        config.reject_true("use_flow_sigmas", config.use_flow_sigmas)?;
        config.reject_true("use_dynamic_shifting", config.use_dynamic_shifting)?;
        if let Some(v) = &config.variance_type {
            return Err(config.unsupported("variance_type", v));
        }
        let prediction = config.prediction(&[
            PredictionType::Epsilon,
            PredictionType::VPrediction,
            PredictionType::Sample,
        ])?;

        let train = config.train_steps()?;
        let ac = schedule::alphas_cumprod(config, train, true)?;
        let lambda_min = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        let last = train - clipped_count(&ac, lambda_min);
        if last == 0 {
            return Err(config.unsupported("lambda_min_clipped", format!("{lambda_min} clips every timestep")));
        }
        let mut timesteps: Vec<f64> = match config.spacing(TimestepSpacing::Linspace)? {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, steps + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .rev()
                    .collect();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last / (steps + 1);
                let offset = config.steps_offset.unwrap_or(0) as f64;
                (1..=steps).rev().map(|i| (i * ratio) as f64 + offset).collect()
            }
            TimestepSpacing::Trailing => schedule::trailing(train as f64, last as f64, steps),
        };
        let base = train_sigmas(&ac);
        let sigmas: Vec<f64> = if config.use_karras_sigmas.unwrap_or(false) {
            // Karras over the whole training range (not the spaced timesteps).
            let lo = config.sigma_min.unwrap_or(base[0] as f64);
            let hi = config.sigma_max.unwrap_or(*base.last().expect("train >= 2") as f64);
            let s = karras_sigmas(lo, hi, steps);
            let log_sigmas = log_f32(&base);
            let round = config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
            timesteps = s
                .iter()
                .map(|&x| {
                    let t = sigma_to_t(x, &log_sigmas);
                    // Then cast to int64 (truncation) as diffusers stores them.
                    if round {
                        t.round_ties_even()
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            s
        } else {
            timesteps.iter().map(|&t| np_interp_index(t, &base)).collect()
        };
        let final_sigma = match config.final_sigmas()? {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => sqrt32((1.0 - ac[0]) / ac[0]),
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(final_sigma);
        Ok(DpmSolverPP {
            timesteps,
            sigmas,
            order,
            solver,
            prediction,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_zero: config.final_sigmas()? == FinalSigma::Zero,
            prev_x0: None,
            lower_order_nums: 0,
            last_step: None,
        })
    }

    /// diffusers' `convert_model_output`: the x0 prediction, in the sample's dtype.
    fn x0(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step]);
        match self.prediction {
            PredictionType::Epsilon => (sample - scalar(sigma) * model_output) / scalar(alpha),
            PredictionType::VPrediction => scalar(alpha) * sample - scalar(sigma) * model_output,
            PredictionType::Sample => model_output.shallow_clone(),
        }
    }

    /// One first-order (DDIM-equivalent) step from `step` to `step + 1`.
    fn first_order(&self, x0: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[step]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let a = sigma_t / sigma_s;
        let b = alpha_t * (exp32(-h) - 1.0);
        scalar(a) * sample - scalar(b) * x0
    }

    /// The second-order multistep update using the previous step's x0.
    fn second_order(&self, x0: &Tensor, prev_x0: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h0 = lambda_s0 - lambda_s1;
        let r0 = h0 / h;
        let d1 = scalar(1.0 / r0) * (x0 - prev_x0);
        let a = sigma_t / sigma_s0;
        let em1 = exp32(-h) - 1.0;
        let b = alpha_t * em1;
        let base = scalar(a) * sample - scalar(b) * x0;
        match self.solver {
            SolverType::Midpoint => base - scalar(0.5 * b) * d1,
            SolverType::Heun => base + scalar(alpha_t * (em1 / h + 1.0)) * d1,
        }
    }
}

/// How many training timesteps at the low-noise end have a log-SNR below
/// `lambda_min_clipped` (`torch.searchsorted` on the flipped lambdas).
fn clipped_count(ac: &[f32], lambda_min_clipped: f64) -> usize {
    if lambda_min_clipped == f64::NEG_INFINITY {
        return 0;
    }
    let ac = Tensor::from_slice(ac);
    let lambdas = ac.sqrt().log() - (ac.ones_like() - &ac).sqrt().log();
    let flipped = lambdas.flip([0]);
    let idx = Tensor::searchsorted_scalar(&flipped, lambda_min_clipped, false, false, "left", None::<Tensor>);
    idx.int64_value(&[]) as usize
}

impl Scheduler for DpmSolverPP {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Steps must come in order; a step that does not follow the previous one
    /// starts a fresh solver history (first order), as a new diffusers run would.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: Option<&Tensor>) -> Tensor {
        if step == 0 || self.last_step != Some(step - 1) {
            self.prev_x0 = None;
            self.lower_order_nums = 0;
        }
        let n = self.timesteps.len();
        let short = self.lower_order_final && n < 15;
        let lower_final = step == n - 1 && (self.euler_at_final || short || self.final_zero);
        let x0 = self.x0(model_output, step, sample);
        let sample = sample.to_kind(Kind::Float);
        let prev = match &self.prev_x0 {
            Some(prev_x0) if self.order == 2 && self.lower_order_nums >= 1 && !lower_final => {
                self.second_order(&x0, prev_x0, step, &sample)
            }
            _ => self.first_order(&x0, step, &sample),
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        self.prev_x0 = Some(x0);
        self.last_step = Some(step);
        prev.to_kind(model_output.kind())
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn pred_original_sample(&self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        self.x0(model_output, step, sample)
    }

    /// alpha_t * x + sigma_t * noise with the scalars in the sample's dtype.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Tensor {
        let sigma = schedule::like_sample(self.sigmas[step].into(), original);
        let alpha_t = (sigma.pow_tensor_scalar(2) + 1.0).pow_tensor_scalar(0.5).reciprocal();
        let sigma_t = &sigma * &alpha_t;
        alpha_t * original + sigma_t * noise
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmPlusPlus2M
    }
}
