//! The UNet's resolution levels: down blocks (resnets, optional attention,
//! strided-conv `downsamplers.0`), the mid block, and up blocks (resnets on
//! the concatenated skip connections, optional attention, nearest-neighbour
//! `upsamplers.0`). `CrossAttnDownBlock2D` and `DownBlock2D` differ only in
//! having `attentions`, so one type serves both (likewise for the up blocks).
use super::attention::{Transformer2DModel, TransformerSettings};
use super::resnet::{ResnetBlock2D, ResnetSettings};
use crate::error::Result;
use crate::nn::Conv2d;
use crate::weights::Vb;
use tch::Tensor;

/// `downsamplers.0`: 3x3 conv with stride 2.
pub struct Downsample2D {
    conv: Conv2d,
    padding: i64,
}

impl Downsample2D {
    pub fn load(vb: &Vb, channels: i64, padding: i64) -> Result<Self> {
        Ok(Downsample2D { conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, padding, true)?, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.padding == 0 {
            // diffusers pads right/bottom only, so odd sizes round down the same way.
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// `upsamplers.0`: nearest-neighbour x2 (or to the skip connection's size
/// when the input size was not a multiple of the total downscale) then 3x3 conv.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: &Vb, channels: i64) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1, true)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let up = match size {
            Some((h, w)) => x.upsample_nearest2d([h, w], None, None),
            None => {
                let (_, _, h, w) = x.size4().expect("Upsample2D input is [B, C, H, W]");
                x.upsample_nearest2d([h * 2, w * 2], 2.0, 2.0)
            }
        };
        self.conv.forward(&up)
    }
}

fn load_attentions(vb: &Vb, count: i64, t: Option<&TransformerSettings>) -> Result<Vec<Transformer2DModel>> {
    match t {
        Some(t) => (0..count).map(|i| Transformer2DModel::load(&vb.pp("attentions").pp(i), t)).collect(),
        None => Ok(Vec::new()),
    }
}

/// One down level. Its outputs after every resnet(+attention) and after the
/// downsampler are the skip connections the up blocks consume.
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

pub struct DownBlockSpec<'a> {
    pub in_channels: i64,
    pub out_channels: i64,
    pub layers: i64,
    /// None for `DownBlock2D`.
    pub transformer: Option<TransformerSettings>,
    /// None for the last (lowest-resolution) block.
    pub downsample_padding: Option<i64>,
    pub resnet: &'a ResnetSettings,
}

impl DownBlock {
    pub fn load(vb: &Vb, s: &DownBlockSpec) -> Result<Self> {
        let resnets = (0..s.layers)
            .map(|i| {
                let in_ch = if i == 0 { s.in_channels } else { s.out_channels };
                ResnetBlock2D::load(&vb.pp("resnets").pp(i), s.resnet, in_ch, s.out_channels, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(vb, s.layers, s.transformer.as_ref())?;
        let downsampler = match s.downsample_padding {
            Some(p) => Some(Downsample2D::load(&vb.pp("downsamplers").pp(0), s.out_channels, p)?),
            None => None,
        };
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    /// Returns the block's output and appends its skip connections to `skips`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Tensor {
        let mut x = x.shallow_clone();
        for i in 0..self.layers() {
            x = self.layer(i, &x, temb, context);
            skips.push(x.shallow_clone());
        }
        if let Some(x_down) = self.downsample(&x) {
            x = x_down;
            skips.push(x.shallow_clone());
        }
        x
    }

    /// Resnet(+attention) layers: each output is a skip connection.
    pub fn layers(&self) -> usize {
        self.resnets.len()
    }

    /// Layer `i`: resnet `i`, then attention `i` where the block has them.
    pub fn layer(&self, i: usize, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let x = self.resnets[i].forward(x, temb);
        match self.attentions.get(i) {
            Some(attn) => attn.forward(&x, context),
            None => x,
        }
    }

    pub fn has_downsampler(&self) -> bool {
        self.downsampler.is_some()
    }

    /// The downsampler's output (also a skip connection); `None` for the
    /// lowest-resolution block.
    pub fn downsample(&self, x: &Tensor) -> Option<Tensor> {
        self.downsampler.as_ref().map(|down| down.forward(x))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer.
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn load(vb: &Vb, channels: i64, t: &TransformerSettings, r: &ResnetSettings, scale: f64) -> Result<Self> {
        // diffusers builds this block with its default of one layer.
        const LAYERS: i64 = 1;
        let resnets = (0..=LAYERS)
            .map(|i| ResnetBlock2D::load(&vb.pp("resnets").pp(i), r, channels, channels, scale))
            .collect::<Result<Vec<_>>>()?;
        Ok(MidBlock { resnets, attentions: load_attentions(vb, LAYERS, Some(t))? })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let mut x = self.resnets[0].forward(x, temb);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(&x, context);
            x = resnet.forward(&x, temb);
        }
        x
    }
}

/// One up level: each resnet takes the previous output concatenated with
/// the most recent unused skip connection.
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

pub struct UpBlockSpec<'a> {
    /// Channels of the deepest skip this block consumes (its last resnet's).
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels coming from the block below.
    pub prev_output_channels: i64,
    pub layers: i64,
    /// None for `UpBlock2D`.
    pub transformer: Option<TransformerSettings>,
    pub add_upsample: bool,
    pub resnet: &'a ResnetSettings,
}

impl UpBlock {
    pub fn load(vb: &Vb, s: &UpBlockSpec) -> Result<Self> {
        let resnets = (0..s.layers)
            .map(|i| {
                let skip_ch = if i == s.layers - 1 { s.in_channels } else { s.out_channels };
                let in_ch = if i == 0 { s.prev_output_channels } else { s.out_channels };
                ResnetBlock2D::load(&vb.pp("resnets").pp(i), s.resnet, in_ch + skip_ch, s.out_channels, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(vb, s.layers, s.transformer.as_ref())?;
        let upsampler =
            if s.add_upsample { Some(Upsample2D::load(&vb.pp("upsamplers").pp(0), s.out_channels)?) } else { None };
        Ok(UpBlock { resnets, attentions, upsampler })
    }

    /// How many skip connections this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's, in the order the down path produced them;
    /// they are consumed from the end. `upsample_size` forces the output size.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(i64, i64)>,
    ) -> Tensor {
        let mut x = x.shallow_clone();
        for (i, skip) in skips.iter().rev().enumerate().take(self.num_skips()) {
            x = self.layer(i, &x, skip, temb, context);
        }
        self.upsample(&x, upsample_size).unwrap_or(x)
    }

    /// Layer `i`: resnet `i` on `x` concatenated with `skip`, then attention
    /// `i` where the block has them.
    pub fn layer(&self, i: usize, x: &Tensor, skip: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let x = self.resnets[i].forward(&Tensor::cat(&[x, skip], 1), temb);
        match self.attentions.get(i) {
            Some(attn) => attn.forward(&x, context),
            None => x,
        }
    }

    pub fn has_upsampler(&self) -> bool {
        self.upsampler.is_some()
    }

    /// The upsampler's output; `None` for the last block.
    pub fn upsample(&self, x: &Tensor, size: Option<(i64, i64)>) -> Option<Tensor> {
        self.upsampler.as_ref().map(|up| up.forward(x, size))
    }
}
