//! The noise schedule shared by all schedulers, computed with the same dtypes
//! and the same operation order as diffusers so the numbers agree to the bit
//! where possible: betas and ᾱ are float32 torch tensors there (computed here
//! with libtorch, so linspace and cumprod are the very same kernels); timesteps
//! and interpolated sigmas go through numpy float64 and are cast to float32.
//! The numpy pieces (`linspace`, float `arange`, `interp`, `round`) are
//! re-implemented below with numpy's exact formulas.
use super::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// A float32 0-d CPU tensor. diffusers' step scalars are such tensors, and on
/// CPU with a float16 operand the side they sit on matters: `s * x` rounds `s`
/// to float16 first, `x * s` multiplies in float32. So the schedulers write
/// every product with the scalar on the same side as diffusers does (libtorch
/// accepts CPU 0-d tensors next to CUDA tensors, as PyTorch does).
pub(crate) fn scalar(x: f32) -> Tensor {
    Tensor::from(x)
}

/// `add_noise`'s coefficient as diffusers makes it (a float32 value cast to
/// the sample's dtype, on the sample's device), made by a fill on that device
/// instead of a host-to-device copy: the same value (the one rounding from the
/// exact float to the dtype), without the copy and stream sync that CUDA pays
/// at every call (inpainting's blend calls it every step).
pub(crate) fn like_sample(value: f64, sample: &Tensor) -> Tensor {
    Tensor::full([1], value, (sample.kind(), sample.device()))
}

/// float32 sqrt / log / exp through libtorch: diffusers computes its step
/// scalars as 0-d float32 torch tensors, and libtorch's CPU kernels are not
/// always correctly rounded (its sqrt differs from IEEE sqrt in about one
/// value in five), so libm would drift by an ulp here and there.
pub(crate) fn sqrt32(x: f32) -> f32 {
    Tensor::from(x).sqrt().double_value(&[]) as f32
}
pub(crate) fn ln32(x: f32) -> f32 {
    Tensor::from(x).log().double_value(&[]) as f32
}
pub(crate) fn exp32(x: f32) -> f32 {
    Tensor::from(x).exp().double_value(&[]) as f32
}

/// ᾱ_t (alphas_cumprod) for t = 0..num_train_timesteps, float32.
pub(crate) fn alphas_cumprod(config: &SchedulerConfig, n: usize, terminal_snr_floor: bool) -> Result<Vec<f32>> {
    let opts = (Kind::Float, Device::Cpu);
    let mut betas = match config.beta_schedule()? {
        BetaSchedule::Linear { start, end } => Tensor::linspace(start, end, n as i64, opts),
        BetaSchedule::ScaledLinear { start, end } => {
            Tensor::linspace(start.sqrt(), end.sqrt(), n as i64, opts).pow_tensor_scalar(2)
        }
        BetaSchedule::SquaredCosCapV2 => Tensor::from_slice(&squaredcos_cap_v2(n)),
        BetaSchedule::Trained(b) => Tensor::from_slice(&b.iter().map(|&x| x as f32).collect::<Vec<_>>()),
    };
    let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
    if rescale {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas = betas.ones_like() - &betas;
    let cumprod = alphas.cumprod(0, None::<Kind>);
    let mut out = Vec::<f32>::try_from(&cumprod).expect("float32 vector");
    // Euler and DPM-Solver pin the last ᾱ to 2^-24 after rescaling (it is 0,
    // which would make sigma infinite); DDIM does not.
    if rescale && terminal_snr_floor {
        *out.last_mut().expect("n >= 2") = 2f32.powi(-24);
    }
    Ok(out)
}

/// Betas from the cosine ᾱ(t) of Nichol & Dhariwal, capped at 0.999; float64
/// math (as Python's `math`), stored as float32.
fn squaredcos_cap_v2(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so the last one is 0.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas = betas.ones_like() - betas;
    let sqrt_ab = alphas.cumprod(0, None::<Kind>).sqrt();
    let first = sqrt_ab.get(0);
    let last = sqrt_ab.get(-1);
    let shifted = &sqrt_ab - &last;
    let scaled = shifted * (&first / (&first - &last));
    let ab = scaled.pow_tensor_scalar(2);
    let n = ab.size()[0];
    let ratios = ab.narrow(0, 1, n - 1) / ab.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[ab.narrow(0, 0, 1), ratios], 0);
    alphas.ones_like() - alphas
}

/// sqrt((1 - ᾱ) / ᾱ) per training timestep, float32 as torch computes it.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    let ac = Tensor::from_slice(alphas_cumprod);
    let sigmas = ((ac.ones_like() - &ac) / &ac).sqrt();
    Vec::<f32>::try_from(&sigmas).expect("float32 vector")
}

/// `np.linspace(start, stop, num)` in float64 (endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|i| i as f64 / div as f64 * delta + start).collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        vec![0.0 * delta + start]
    };
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with a float step: numpy takes
/// ceil((stop - start) / step) elements, each `start + i * ((start + step) - start)`.
/// The length can come out one more than expected (1000 / 61 steps gives 62).
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| if i == 0 { start } else { start + i as f64 * delta })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` for x inside [0, len - 1].
pub(crate) fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    let y = slope * (x - j as f64) + fp[j] as f64;
    if y.is_nan() {
        slope * (x - (j + 1) as f64) + fp[j + 1] as f64
    } else {
        y
    }
}

/// "leading" spacing: multiples of train // count, largest first, plus
/// steps_offset (DDIM, Euler; DPM-Solver has its own count + 1 variant).
pub(crate) fn leading(count: usize, train: usize, offset: i64) -> Vec<f64> {
    let ratio = train / count;
    (0..count).rev().map(|i| (i * ratio) as f64 + offset as f64).collect()
}

/// "trailing" spacing: round(np.arange(last, 0, -train / count)) - 1, where
/// `last` is the number of usable training timesteps (all but DPM-Solver's
/// lambda-clipped ones).
pub(crate) fn trailing(train_f: f64, last: f64, count: usize) -> Vec<f64> {
    let ratio = train_f / count as f64;
    np_arange_f64(last, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// `_sigma_to_t`: the fractional training timestep whose log-sigma matches,
/// by linear interpolation in log-sigma. `log_sigmas` is float32 (numpy takes
/// the log in float32), `sigma` float64.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Last index whose log-sigma is <= log_sigma (0 if none), at most len - 2.
    let mut low = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(log_sigmas.len() - 2);
    let lo = log_sigmas[low] as f64;
    let hi = log_sigmas[low + 1] as f64;
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `np.log` of a float32 array. numpy's SIMD float32 log is not correctly
/// rounded; this one is, so single entries can differ by one float32 ulp. That
/// only moves Karras-sigma timesteps (never the sigmas) by ~1e-5.
pub(crate) fn log_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| (v as f64).ln() as f32).collect()
}

/// Karras et al. 2022 (eq. 5) sigmas with rho = 7, float64 as numpy computes them.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, count: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, count)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Which spacing a class uses for its raw (pre-sigma) timesteps; shared by
/// Euler-type schedulers, which keep them as float32.
pub(crate) fn euler_timesteps(spacing: TimestepSpacing, count: usize, train: usize, offset: i64) -> Vec<f64> {
    match spacing {
        // np.linspace(..., dtype=float32): float64 math, then cast.
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, count)
            .into_iter()
            .rev()
            .map(|t| t as f32 as f64)
            .collect(),
        TimestepSpacing::Leading => leading(count, train, offset),
        TimestepSpacing::Trailing => trailing(train as f64, train as f64, count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_quirk_gives_one_extra_element() {
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 60.0).len(), 60);
    }

    #[test]
    fn linspace_matches_numpy_edges() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        let v = np_linspace(0.0, 999.0, 4);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
    }

    #[test]
    fn interp_hits_grid_points_exactly() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(np_interp_index(1.0, &fp), 2.0);
        assert_eq!(np_interp_index(1.5, &fp), 3.0);
        assert_eq!(np_interp_index(7.0, &fp), 4.0);
    }
}
