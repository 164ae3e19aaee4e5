//! The heatmap and score heads over the B x d x n x n map of encoded image tokens,
//! with the checkpoint's key names (`nn.Sequential` indices included).
use crate::error::Result;
use crate::nn::{Conv2d, Linear};
use crate::rahf::config::{HeatmapHeadConfig, ScoreHeadConfig};
use crate::weights::Vb;
use tch::{Kind, Tensor};

/// T5-style RMS norm over channels: `x * rsqrt(mean_c(x²) + 1e-8) * scale`, `scale` C x 1 x 1, no bias.
pub struct Norm {
    scale: Tensor,
}

impl Norm {
    pub fn load(vb: &Vb, channels: i64) -> Result<Self> {
        Ok(Norm {
            scale: vb.get("scale", &[channels, 1, 1])?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let var = x.square().mean_dim(1, true, x.kind());
        x * (var + 1e-8).rsqrt() * &self.scale
    }
}

fn conv3(vb: &Vb, cin: i64, cout: i64) -> Result<Conv2d> {
    Conv2d::load(vb, cin, cout, 3, 1, 1, true)
}

/// ConvTranspose2d(k3, s2, p1, output_padding 1): doubles the spatial size.
struct Upsample {
    weight: Tensor, // [in, out, 3, 3]
    bias: Tensor,
}

impl Upsample {
    fn load(vb: &Vb, cin: i64, cout: i64) -> Result<Self> {
        Ok(Upsample {
            weight: vb.get("weight", &[cin, cout, 3, 3])?,
            bias: vb.get("bias", &[cout])?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(&self.weight, Some(&self.bias), [2, 2], [1, 1], [1, 1], 1, [1, 1])
    }
}

/// One 2x stage: `deconv_layers.i` = (ConvT, Norm, ReLU); `conv_layers2.i` =
/// (conv, Norm, ReLU, conv, Norm); the stage adds its deconv output back, then ReLU.
struct UpStage {
    up: Upsample,
    up_norm: Norm,
    conv_a: Conv2d,
    norm_a: Norm,
    conv_b: Conv2d,
    norm_b: Norm,
}

pub struct HeatmapPredictor {
    conv0: Conv2d,
    norm0: Norm,
    conv1: Conv2d,
    norm1: Norm,
    stages: Vec<UpStage>,
    last_conv1: Conv2d,
    last_conv2: Conv2d,
}

impl HeatmapPredictor {
    pub fn load(vb: &Vb, d: i64, cfg: &HeatmapHeadConfig) -> Result<Self> {
        let [c0, c1] = cfg.conv_channels;
        let cl = vb.pp("conv_layers");
        let mut stages = Vec::new();
        let mut cin = c1;
        for (i, &cout) in cfg.deconv_channels.iter().enumerate() {
            let d = vb.pp("deconv_layers").pp(i);
            let c = vb.pp("conv_layers2").pp(i);
            stages.push(UpStage {
                up: Upsample::load(&d.pp(0), cin, cout)?,
                up_norm: Norm::load(&d.pp(1), cout)?,
                conv_a: conv3(&c.pp(0), cout, cout)?,
                norm_a: Norm::load(&c.pp(1), cout)?,
                conv_b: conv3(&c.pp(3), cout, cout)?,
                norm_b: Norm::load(&c.pp(4), cout)?,
            });
            cin = cout;
        }
        Ok(HeatmapPredictor {
            conv0: conv3(&cl.pp(0), d, c0)?,
            norm0: Norm::load(&cl.pp(2), c0)?,
            conv1: conv3(&cl.pp(3), c0, c1)?,
            norm1: Norm::load(&cl.pp(5), c1)?,
            stages,
            last_conv1: conv3(&vb.pp("last_conv1"), cin, cfg.last_channels)?,
            last_conv2: conv3(&vb.pp("last_conv2"), cfg.last_channels, 1)?,
        })
    }

    /// B x d x n x n -> B x (n·2^stages) x (n·2^stages), in [0, 1].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // Here ReLU comes before the norm, unlike everywhere else in the heads.
        let mut x = self.norm0.forward(&self.conv0.forward(x).relu());
        x = self.norm1.forward(&self.conv1.forward(&x).relu());
        // Each stage doubles the size, so the last ones dominate memory (at
        // 384x384, 192 channels, a batch of 32 is 3.6 GB a tensor): every
        // step replaces its input, so no intermediate outlives its use.
        for s in &self.stages {
            let mut skip = s.up.forward(&x);
            skip = s.up_norm.forward(&skip);
            skip = skip.relu();
            let mut y = s.conv_a.forward(&skip);
            y = s.norm_a.forward(&y);
            y = y.relu();
            y = s.conv_b.forward(&y);
            y = s.norm_b.forward(&y);
            x = (y + skip).relu();
        }
        let x = self.last_conv1.forward(&x).relu();
        self.last_conv2.forward(&x).sigmoid().squeeze_dim(1)
    }
}

pub struct ScorePredictor {
    convs: Vec<(Conv2d, Norm)>,
    linear: [Linear; 3],
}

impl ScorePredictor {
    /// `n_patches`: image tokens without CLS (grid²), which the flattened conv output spans.
    pub fn load(vb: &Vb, d: i64, n_patches: i64, cfg: &ScoreHeadConfig) -> Result<Self> {
        let cl = vb.pp("conv_layers");
        let mut convs = Vec::new();
        let mut cin = d;
        for (i, cout) in cfg.conv_channels(d).into_iter().enumerate() {
            convs.push((conv3(&cl.pp(3 * i), cin, cout)?, Norm::load(&cl.pp(3 * i + 1), cout)?));
            cin = cout;
        }
        let ll = vb.pp("linear_layers");
        let [l0, l1] = cfg.linear_channels;
        Ok(ScorePredictor {
            convs,
            linear: [
                Linear::load(&ll.pp(0), cin * n_patches, l0, true)?,
                Linear::load(&ll.pp(2), l0, l1, true)?,
                Linear::load(&ll.pp(4), l1, 1, true)?,
            ],
        })
    }

    /// B x d x n x n -> B, in [0, 1].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for (conv, norm) in &self.convs {
            x = norm.forward(&conv.forward(&x)).relu();
        }
        let x = x.flatten(1, -1);
        let x = self.linear[0].forward(&x).relu();
        let x = self.linear[1].forward(&x).relu();
        self.linear[2].forward(&x).sigmoid().flatten(0, -1)
    }
}

/// Parameters of freshly initialised heads, like PyTorch's defaults (Conv2d,
/// ConvTranspose2d and Linear: kaiming-uniform(a=√5) weights, biases uniform in
/// ±1/√fan_in; norm scales 1), named as in the checkpoint under `prefix`.
/// `rahf init` uses this for the heads the HF backbones do not provide.
pub fn init_heatmap_head(prefix: &str, d: i64, cfg: &HeatmapHeadConfig) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    let [c0, c1] = cfg.conv_channels;
    conv_init(&mut out, &format!("{prefix}.conv_layers.0"), d, c0, false);
    norm_init(&mut out, &format!("{prefix}.conv_layers.2"), c0);
    conv_init(&mut out, &format!("{prefix}.conv_layers.3"), c0, c1, false);
    norm_init(&mut out, &format!("{prefix}.conv_layers.5"), c1);
    let mut cin = c1;
    for (i, &cout) in cfg.deconv_channels.iter().enumerate() {
        conv_init(&mut out, &format!("{prefix}.deconv_layers.{i}.0"), cin, cout, true);
        norm_init(&mut out, &format!("{prefix}.deconv_layers.{i}.1"), cout);
        conv_init(&mut out, &format!("{prefix}.conv_layers2.{i}.0"), cout, cout, false);
        norm_init(&mut out, &format!("{prefix}.conv_layers2.{i}.1"), cout);
        conv_init(&mut out, &format!("{prefix}.conv_layers2.{i}.3"), cout, cout, false);
        norm_init(&mut out, &format!("{prefix}.conv_layers2.{i}.4"), cout);
        cin = cout;
    }
    conv_init(&mut out, &format!("{prefix}.last_conv1"), cin, cfg.last_channels, false);
    conv_init(&mut out, &format!("{prefix}.last_conv2"), cfg.last_channels, 1, false);
    out
}

/// See [`init_heatmap_head`].
pub fn init_score_head(prefix: &str, d: i64, n_patches: i64, cfg: &ScoreHeadConfig) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    let mut cin = d;
    for (i, cout) in cfg.conv_channels(d).into_iter().enumerate() {
        conv_init(&mut out, &format!("{prefix}.conv_layers.{}", 3 * i), cin, cout, false);
        norm_init(&mut out, &format!("{prefix}.conv_layers.{}", 3 * i + 1), cout);
        cin = cout;
    }
    let [l0, l1] = cfg.linear_channels;
    for (idx, (i, o)) in [(cin * n_patches, l0), (l0, l1), (l1, 1)].into_iter().enumerate() {
        let bound = 1.0 / (i as f64).sqrt();
        out.push((
            format!("{prefix}.linear_layers.{}.weight", 2 * idx),
            uniform(&[o, i], bound),
        ));
        out.push((format!("{prefix}.linear_layers.{}.bias", 2 * idx), uniform(&[o], bound)));
    }
    out
}

fn uniform(shape: &[i64], bound: f64) -> Tensor {
    Tensor::empty(shape, (Kind::Float, tch::Device::Cpu)).uniform_(-bound, bound)
}

fn conv_init(out: &mut Vec<(String, Tensor)>, name: &str, cin: i64, cout: i64, transposed: bool) {
    // PyTorch's fan_in is weight.size(1) * k*k: `out` channels for a transposed conv.
    let fan_in = (if transposed { cout } else { cin } * 9) as f64;
    let bound = 1.0 / fan_in.sqrt(); // kaiming_uniform(a=√5) reduces to this bound
    let shape = if transposed {
        [cin, cout, 3, 3]
    } else {
        [cout, cin, 3, 3]
    };
    out.push((format!("{name}.weight"), uniform(&shape, bound)));
    out.push((format!("{name}.bias"), uniform(&[cout], bound)));
}

fn norm_init(out: &mut Vec<(String, Tensor)>, name: &str, c: i64) {
    out.push((
        format!("{name}.scale"),
        Tensor::ones([c, 1, 1], (Kind::Float, tch::Device::Cpu)),
    ));
}
