//! `ResnetBlock2D`: two GroupNorm -> act -> conv stages with the time
//! embedding added in between, plus a 1x1 `conv_shortcut` when the channel
//! count changes.
use crate::error::Result;
use crate::nn::{activation, Conv2d, GroupNorm, Linear};
use crate::weights::Vb;
use tch::Tensor;

/// What every resnet of one UNet shares, from the config.
#[derive(Debug, Clone)]
pub struct ResnetSettings {
    pub groups: i64,
    pub eps: f64,
    pub temb_channels: i64,
    pub act: String,
}

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: String,
    /// The mid block divides its residual sums by `mid_block_scale_factor`.
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: &Vb, s: &ResnetSettings, in_ch: i64, out_ch: i64, output_scale_factor: f64) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(Conv2d::load(&vb.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0, true)?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&vb.pp("norm1"), s.groups, in_ch, s.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1, true)?,
            time_emb_proj: Linear::load(&vb.pp("time_emb_proj"), s.temb_channels, out_ch, true)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), s.groups, out_ch, s.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1, true)?,
            conv_shortcut,
            act: s.act.clone(),
            output_scale_factor,
        })
    }

    fn act(&self, x: &Tensor) -> Tensor {
        activation(&self.act, x).expect("activation validated with the config")
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.act(&self.norm1.forward(x)));
        let t = self.time_emb_proj.forward(&self.act(temb)).unsqueeze(-1).unsqueeze(-1);
        let h = self.norm2.forward(&(h + t));
        let h = self.conv2.forward(&self.act(&h));
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        // Dividing by 1.0 is exact, but skip it so the common path does one op fewer.
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}
