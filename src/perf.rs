//! Performance levers, each switchable by an environment variable (`1`/`0`,
//! `true`/`false`, `on`/`off`) so `scripts/bench/` can time it on and off in
//! one run. The defaults are what the benchmarks measured (README,
//! "Benchmarks"); none changes what is computed, only the memory layout or
//! where work is done:
//!
//! - `ORCHESTRATE_CHANNELS_LAST` ([`channels_last`]): UNet and VAE conv
//!   weights in channels-last (NHWC) memory format, so the convolutions, and
//!   what follows them, run channels-last;
//! - `ORCHESTRATE_CUDNN_BENCHMARK` ([`cudnn_benchmark`]): cuDNN's autotuner
//!   picks each convolution's algorithm on CUDA (set when a CUDA device is
//!   chosen, [`configure_device`]);
//! - `ORCHESTRATE_NOISE_ON_DEVICE` ([`noise_on_device`]): no host-to-device
//!   copy inside the step loop: every step's noise goes to the device in one
//!   copy before the first step, and the timestep embedding's input is made on
//!   the device (a fill) instead of copied from the host at every UNet call
//!   (PyTorch follows each such copy with a stream sync);
//! - `ORCHESTRATE_VIT_SDPA` ([`vit_sdpa`]): RAHF's ViT attends through
//!   `scaled_dot_product_attention` instead of matmul-softmax-matmul;
//! - `ORCHESTRATE_T5_SDPA` ([`t5_sdpa`]): the T5 encoder (RAHF's, SD3's and
//!   FLUX's) attends through `scaled_dot_product_attention`, its relative
//!   position bias (and padding mask) as the additive mask, instead of
//!   transformers' matmul-softmax-matmul.
use std::cell::Cell;
use std::sync::OnceLock;
use tch::Device;

fn flag(var: &str, default: bool) -> bool {
    match std::env::var(var) {
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "on" | "yes" => true,
            "0" | "false" | "off" | "no" => false,
            other => {
                tracing::warn!("{var}={other}: expected 1 or 0; using the default ({default})");
                default
            }
        },
        Err(_) => default,
    }
}

macro_rules! lever {
    ($(#[$doc:meta])* $name:ident, $var:literal, $default:expr) => {
        $(#[$doc])*
        pub fn $name() -> bool {
            static V: OnceLock<bool> = OnceLock::new();
            *V.get_or_init(|| flag($var, $default))
        }
    };
}

lever!(
    /// Channels-last UNet/VAE convolutions. On by default: on a quiet CPU it
    /// sampled SD 1.5 at 512x512 in 0.78x the time (README); on CUDA
    /// `scripts/gpu-check` times it on and off.
    channels_last,
    "ORCHESTRATE_CHANNELS_LAST",
    true
);
lever!(
    /// cuDNN autotuning. Off by default (PyTorch's and diffusers' default:
    /// the algorithm it picks can differ between runs, and with it the last bits).
    cudnn_benchmark,
    "ORCHESTRATE_CUDNN_BENCHMARK",
    false
);
lever!(
    /// Step noise staged and the timestep made on the device. On by default:
    /// the values are the same bits either way, and it removes host-to-device
    /// copies and their syncs from every step.
    noise_on_device,
    "ORCHESTRATE_NOISE_ON_DEVICE",
    true
);
lever!(
    /// SDPA in RAHF's ViT. On by default (faster and within the parity
    /// tests' tolerance; README).
    vit_sdpa,
    "ORCHESTRATE_VIT_SDPA",
    true
);
lever!(
    /// SDPA in T5 (encoder and RAHF's keyword decoder), the position bias as
    /// the additive mask. Off by default: on the CPU it did not win (0.97x
    /// RAHF's images/s at batch 1, within the box's noise; README), and off
    /// is transformers' own (eager) computation; `scripts/gpu-check` times it
    /// on CUDA.
    t5_sdpa,
    "ORCHESTRATE_T5_SDPA",
    false
);

/// Device-wide settings, once a device is chosen.
pub fn configure_device(device: Device) {
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(cudnn_benchmark());
    }
}

thread_local! {
    static CHANNELS_LAST_LOAD: Cell<bool> = const { Cell::new(false) };
}

/// While alive, [`crate::nn::Conv2d::load`] on this thread stores frozen
/// weights channels-last when [`channels_last`] is on (the UNet's and VAE's
/// loaders hold one; trainable weights are never converted).
pub struct ChannelsLastLoad {
    previous: bool,
}

impl ChannelsLastLoad {
    pub fn enter() -> Self {
        let previous = CHANNELS_LAST_LOAD.with(|c| c.replace(channels_last()));
        ChannelsLastLoad { previous }
    }

    /// Whether a conv weight loaded now is to be made channels-last.
    pub fn active() -> bool {
        CHANNELS_LAST_LOAD.with(|c| c.get())
    }
}

impl Drop for ChannelsLastLoad {
    fn drop(&mut self) {
        CHANNELS_LAST_LOAD.with(|c| c.set(self.previous));
    }
}

/// `t` [N, C, H, W] with channels-last strides (same shape and values).
pub fn to_channels_last(t: &tch::Tensor) -> tch::Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}
