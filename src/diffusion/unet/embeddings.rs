//! The timestep embedding: a fixed sinusoidal projection of the timestep
//! (`time_proj`, no weights) followed by the learned `time_embedding` MLP.
use crate::error::Result;
use crate::nn::{activation, Linear};
use crate::weights::Vb;
use tch::{Device, Kind, Tensor};

/// diffusers' `get_timestep_embedding` for one timestep shared by a batch of
/// `batch`, as float32 `[batch, dim]`. The op order and dtypes follow the
/// Python so the values agree bit for bit: diffusers turns a Python float
/// timestep into a float64 tensor, then computes in float32.
pub fn timestep_embedding(
    timestep: f64,
    batch: i64,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: Device,
) -> Tensor {
    // Made on the device (a fill, same float64 value) rather than copied from
    // the host, a copy PyTorch follows with a stream sync at every UNet call.
    let t = if crate::perf::noise_on_device() {
        Tensor::full([batch], timestep, (Kind::Double, device))
    } else {
        Tensor::from_slice(&[timestep]).to_device(device).expand([batch], false)
    };
    sinusoidal_embedding(&t, dim, flip_sin_to_cos, freq_shift)
}

/// `get_timestep_embedding` of a 1-D tensor of timesteps (any float dtype;
/// computed in float32 as diffusers' `timesteps[:, None].float()` does):
/// float32 `[N, dim]`. SDXL's `add_time_proj` embeds its size/crop ids with it.
pub fn sinusoidal_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    const MAX_PERIOD: f64 = 10000.0;
    let device = timesteps.device();
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-MAX_PERIOD.ln());
    let exponent = exponent / (half as f64 - freq_shift);
    let freqs = exponent.exp();
    let t = timesteps.to_kind(Kind::Float);
    let args = t.unsqueeze(1) * freqs.unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], -1) } else { Tensor::cat(&[sin, cos], -1) };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `time_embedding`: linear_1 -> act -> linear_2 (-> optional post act).
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: String,
    post_act: Option<String>,
}

impl TimestepEmbedding {
    pub fn load(vb: &Vb, in_dim: i64, out_dim: i64, act: &str, post_act: Option<&str>) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::load(&vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), out_dim, out_dim, true)?,
            act: act.to_string(),
            post_act: post_act.map(str::to_string),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.linear_1.forward(x);
        let x = activation(&self.act, &x).expect("activation validated with the config");
        let x = self.linear_2.forward(&x);
        match &self.post_act {
            Some(a) => activation(a, &x).expect("activation validated with the config"),
            None => x,
        }
    }
}
