//! `UNet2DConditionModel`: conv_in, time embedding, down blocks, mid block,
//! up blocks (fed the down path's skip connections), norm/act/conv_out.
use super::attention::TransformerSettings;
use super::blocks::{DownBlock, DownBlockSpec, MidBlock, UpBlock, UpBlockSpec};
use super::config::{block_type_name, UNetConfig};
use super::embeddings::{sinusoidal_embedding, timestep_embedding, TimestepEmbedding};
use super::resnet::ResnetSettings;
use crate::error::Result;
use crate::nn::{activation, Conv2d, GroupNorm};
use crate::weights::{ConfigCheck, Vb};
use tch::{Kind, Tensor};

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// SDXL's `add_embedding` (`addition_embed_type: text_time`).
    add_embedding: Option<TimestepEmbedding>,
    kind: Kind,
}

/// The timesteps of a UNet call: one for the whole batch (sampling), or one
/// per sample (training).
pub enum Timesteps {
    Shared(f64),
    PerSample(Tensor),
}

/// SDXL's added conditioning (diffusers' `added_cond_kwargs`), one row per
/// UNet batch entry (both CFG halves).
#[derive(Debug)]
pub struct AddedCond {
    /// `[B, projection_dim]`: the pooled, projected prompt embedding of the
    /// second text encoder.
    pub text_embeds: Tensor,
    /// `[B, n]`: original size, crop top-left, then target size (or the
    /// aesthetic score), each sinusoidally embedded by `add_time_proj`.
    pub time_ids: Tensor,
}

impl AddedCond {
    /// Rows `[a; b]`.
    pub fn cat(a: &AddedCond, b: &AddedCond) -> AddedCond {
        AddedCond {
            text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0),
            time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0),
        }
    }

    pub fn shallow_clone(&self) -> AddedCond {
        AddedCond { text_embeds: self.text_embeds.shallow_clone(), time_ids: self.time_ids.shallow_clone() }
    }

    /// Each row repeated `n` times (`[a, a, b, b]` for n = 2), as diffusers
    /// repeats per-prompt conditioning for its images.
    pub fn repeat_rows(&self, n: i64) -> AddedCond {
        AddedCond {
            text_embeds: self.text_embeds.repeat_interleave_self_int(n, 0, None),
            time_ids: self.time_ids.repeat_interleave_self_int(n, 0, None),
        }
    }
}

impl UNet2DConditionModel {
    /// Builds the model the config describes from the weights under `vb`
    /// (the root of `unet/diffusion_pytorch_model.safetensors`).
    pub fn load(vb: Vb, config: UNetConfig) -> Result<Self> {
        let _channels_last = crate::perf::ChannelsLastLoad::enter();
        config.validate()?;
        check_weights(&vb, &config)?;
        let c = &config;
        let n = c.num_blocks();
        let ch = &c.block_out_channels;
        let groups = c.groups();
        let resnet =
            ResnetSettings { groups, eps: c.norm_eps, temb_channels: c.time_embed_dim(), act: c.act_fn.clone() };
        let transformer = |i: usize, channels: i64| TransformerSettings {
            channels,
            heads: c.heads(i),
            cross_attention_dim: c.cross_attention_dim.get(i),
            layers: c.transformer_layers_per_block.get(i),
            groups,
            use_linear_projection: c.use_linear_projection,
        };

        let conv_in = Conv2d::load(
            &vb.pp("conv_in"),
            c.in_channels,
            ch[0],
            c.conv_in_kernel,
            1,
            (c.conv_in_kernel - 1) / 2,
            true,
        )?;
        let time_embedding = TimestepEmbedding::load(
            &vb.pp("time_embedding"),
            ch[0],
            c.time_embed_dim(),
            &c.act_fn,
            c.timestep_post_act.as_deref(),
        )?;

        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let is_final = i == n - 1;
            let spec = DownBlockSpec {
                in_channels: if i == 0 { ch[0] } else { ch[i - 1] },
                out_channels: ch[i],
                layers: c.layers_per_block.get(i),
                transformer: is_cross_attn(kind).then(|| transformer(i, ch[i])),
                downsample_padding: (!is_final).then_some(c.downsample_padding),
                resnet: &resnet,
            };
            down_blocks.push(DownBlock::load(&vb.pp("down_blocks").pp(i), &spec)?);
        }

        let mid_block = match &c.mid_block_type {
            Some(_) => Some(MidBlock::load(
                &vb.pp("mid_block"),
                ch[n - 1],
                &transformer(n - 1, ch[n - 1]),
                &resnet,
                c.mid_block_scale_factor,
            )?),
            None => None,
        };

        // Up block i mirrors down block n-1-i.
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_output = ch[n - 1];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let mirror = n - 1 - i;
            let out_channels = ch[mirror];
            let spec = UpBlockSpec {
                in_channels: ch[mirror.saturating_sub(1)],
                out_channels,
                prev_output_channels: prev_output,
                layers: c.layers_per_block.get(mirror) + 1,
                transformer: is_cross_attn(kind).then(|| transformer(mirror, out_channels)),
                add_upsample: i != n - 1,
                resnet: &resnet,
            };
            up_blocks.push(UpBlock::load(&vb.pp("up_blocks").pp(i), &spec)?);
            prev_output = out_channels;
        }

        let conv_norm_out = GroupNorm::load(&vb.pp("conv_norm_out"), groups, ch[0], c.norm_eps)?;
        let conv_out = Conv2d::load(
            &vb.pp("conv_out"),
            ch[0],
            c.out_channels,
            c.conv_out_kernel,
            1,
            (c.conv_out_kernel - 1) / 2,
            true,
        )?;
        // diffusers builds `add_embedding` as a plain `TimestepEmbedding`
        // (silu, no post activation) whatever the UNet's `act_fn`.
        let add_embedding = match c.addition_embed_type {
            Some(_) => Some(TimestepEmbedding::load(
                &vb.pp("add_embedding"),
                c.projection_class_embeddings_input_dim.expect("validated"),
                c.time_embed_dim(),
                "silu",
                None,
            )?),
            None => None,
        };
        let kind = vb.kind();
        Ok(UNet2DConditionModel {
            config,
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            add_embedding,
            kind,
        })
    }

    /// The time embedding every resnet receives, in the model's dtype.
    fn time_embed(&self, timesteps: &Timesteps, batch: i64, device: tch::Device, added: Option<&AddedCond>) -> Tensor {
        let c = &self.config;
        let t = match timesteps {
            Timesteps::Shared(t) => {
                timestep_embedding(*t, batch, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, device)
            }
            Timesteps::PerSample(t) => {
                sinusoidal_embedding(&t.to_device(device), c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
            }
        };
        // The sinusoids are float32 whatever the weights are; diffusers casts
        // them to the sample's dtype before the MLP, and so do we.
        let mut emb = self.time_embedding.forward(&t.to_kind(self.kind));
        if let Some(add_embedding) = &self.add_embedding {
            let added = added.expect("an SDXL UNet is called with its added conditioning (text_embeds, time_ids)");
            let dim = c.addition_time_embed_dim.expect("validated");
            let ids = added.time_ids.to_device(device);
            let time_embeds = sinusoidal_embedding(&ids.flatten(0, -1), dim, c.flip_sin_to_cos, c.freq_shift)
                .reshape([ids.size()[0], -1]);
            let text_embeds = added.text_embeds.to_device(device).to_kind(Kind::Float);
            let add = Tensor::cat(&[text_embeds, time_embeds], -1).to_kind(self.kind);
            emb = emb + add_embedding.forward(&add);
        }
        match &c.time_embedding_act_fn {
            Some(a) => activation(a, &emb).expect("activation validated with the config"),
            None => emb,
        }
    }

    /// Predicts the noise (or v) for `sample`.
    ///
    /// sample: [B, in_channels, h, w]; timestep: one float for the whole
    /// batch; encoder_hidden_states: [B, L, cross_attention_dim]. Inputs are
    /// cast to the weights' dtype; the output has that dtype.
    pub fn forward(&self, sample: &Tensor, timestep: f64, encoder_hidden_states: &Tensor) -> Tensor {
        self.forward_added(sample, timestep, encoder_hidden_states, None)
    }

    /// Whether the UNet takes SDXL's added conditioning.
    pub fn takes_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// [`Self::forward`] with SDXL's added conditioning (required exactly when
    /// [`Self::takes_added_cond`]).
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Tensor {
        self.forward_timesteps(sample, &Timesteps::Shared(timestep), encoder_hidden_states, added)
    }

    /// [`Self::forward_added`] with the timesteps as training draws them:
    /// one per sample (`[B]`, any dtype; embedded in float32 as diffusers does).
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &Timesteps,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Tensor {
        let context = encoder_hidden_states.to_kind(self.kind);
        let batch = sample.size()[0];
        let temb = self.time_embed(timesteps, batch, sample.device(), added);
        self.run_pieces(sample, &temb, &context, None)
    }

    /// [`Self::forward_added`] without gradients, keeping each piece's input
    /// (a down layer's is the skip before it, so the down path costs nothing
    /// extra) for [`SavedUNet::vjp`]: the gradient then goes back one
    /// recomputed piece (one resnet and its attention, a resampler, the mid
    /// block, the head) at a time, so a backward pass holds one piece's
    /// activations instead of the whole UNet's, for one more forward.
    pub fn forward_saved(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> (Tensor, SavedUNet<'_>) {
        tch::no_grad(|| {
            let context = encoder_hidden_states.to_kind(self.kind);
            let batch = sample.size()[0];
            let temb = self.time_embed(&Timesteps::Shared(timestep), batch, sample.device(), added);
            let mut tape = Tape::default();
            let out = self.run_pieces(sample, &temb, &context, Some(&mut tape));
            (out, SavedUNet { unet: self, temb, context, tape })
        })
    }

    /// The pieces in order: conv_in, each down layer and downsampler (their
    /// outputs are the skips), the mid block, each up layer (consuming the
    /// newest unused skip) and upsampler, the head. With `tape`, each piece
    /// is recorded with its input and every skip is kept; without, skips are
    /// dropped as the up path consumes them.
    fn run_pieces(&self, sample: &Tensor, temb: &Tensor, context: &Tensor, mut tape: Option<&mut Tape>) -> Tensor {
        let (_, _, h, w) = sample.size4().expect("UNet sample is [B, C, H, W]");
        // Sizes not divisible by the total downscale make the down path round
        // down; the up path must then upsample to each skip's exact size.
        let factor = 1i64 << (self.up_blocks.len().saturating_sub(1));
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let mut skips: Vec<Option<Tensor>> = Vec::new();
        let mut x = sample.shallow_clone();
        let mut run = |piece: Piece, x: &mut Tensor, skips: &mut Vec<Option<Tensor>>, skip_in: Option<usize>| {
            let input = std::mem::replace(x, Tensor::new());
            let skip = skip_in.map(|k| match &tape {
                Some(_) => skips[k].as_ref().expect("a skip is consumed once").shallow_clone(),
                None => skips[k].take().expect("a skip is consumed once"),
            });
            *x = self.piece(piece, &input, skip.as_ref(), temb, context);
            let skip_out = piece.makes_skip().then(|| {
                skips.push(Some(x.shallow_clone()));
                skips.len() - 1
            });
            if let Some(t) = tape.as_mut() {
                t.steps.push(TapeStep { piece, input, skip_in, skip_out });
            }
        };
        run(Piece::ConvIn, &mut x, &mut skips, None);
        for (b, block) in self.down_blocks.iter().enumerate() {
            for l in 0..block.layers() {
                run(Piece::Down(b, l), &mut x, &mut skips, None);
            }
            if block.has_downsampler() {
                run(Piece::Downsample(b), &mut x, &mut skips, None);
            }
        }
        if self.mid_block.is_some() {
            run(Piece::Mid, &mut x, &mut skips, None);
        }
        let mut next = skips.len();
        for (b, block) in self.up_blocks.iter().enumerate() {
            for l in 0..block.num_skips() {
                next -= 1;
                run(Piece::Up(b, l), &mut x, &mut skips, Some(next));
            }
            if block.has_upsampler() {
                let is_final = b == self.up_blocks.len() - 1;
                let size = match next.checked_sub(1).and_then(|k| skips[k].as_ref()) {
                    Some(s) if forward_upsample_size && !is_final => {
                        let s = s.size();
                        Some((s[2], s[3]))
                    }
                    _ => None,
                };
                run(Piece::Upsample(b, size), &mut x, &mut skips, None);
            }
        }
        run(Piece::Head, &mut x, &mut skips, None);
        if let Some(t) = tape {
            t.skips = skips;
        }
        x
    }

    /// One piece of the forward pass on its input (and, for an up layer, its skip).
    fn piece(&self, piece: Piece, x: &Tensor, skip: Option<&Tensor>, temb: &Tensor, context: &Tensor) -> Tensor {
        match piece {
            Piece::ConvIn => {
                let sample = x.to_kind(self.kind);
                let sample = if self.config.center_input_sample { sample * 2.0 - 1.0 } else { sample };
                self.conv_in.forward(&sample)
            }
            Piece::Down(b, l) => self.down_blocks[b].layer(l, x, temb, context),
            Piece::Downsample(b) => self.down_blocks[b].downsample(x).expect("planned only where the block has one"),
            Piece::Mid => self.mid_block.as_ref().expect("planned only with a mid block").forward(x, temb, context),
            Piece::Up(b, l) => {
                self.up_blocks[b].layer(l, x, skip.expect("an up layer is given its skip"), temb, context)
            }
            Piece::Upsample(b, size) => {
                self.up_blocks[b].upsample(x, size).expect("planned only where the block has one")
            }
            Piece::Head => {
                let x = self.conv_norm_out.forward(x);
                let x = activation(&self.config.act_fn, &x).expect("activation validated with the config");
                self.conv_out.forward(&x)
            }
        }
    }
}

/// One piece of the UNet's forward pass (see [`UNet2DConditionModel::forward_saved`]).
#[derive(Debug, Clone, Copy)]
enum Piece {
    ConvIn,
    /// Down block, layer.
    Down(usize, usize),
    Downsample(usize),
    Mid,
    /// Up block, layer.
    Up(usize, usize),
    /// Up block, the forced output size.
    Upsample(usize, Option<(i64, i64)>),
    Head,
}

impl Piece {
    fn makes_skip(self) -> bool {
        matches!(self, Piece::ConvIn | Piece::Down(..) | Piece::Downsample(_))
    }
}

struct TapeStep {
    piece: Piece,
    input: Tensor,
    skip_in: Option<usize>,
    skip_out: Option<usize>,
}

#[derive(Default)]
struct Tape {
    steps: Vec<TapeStep>,
    /// Every skip connection, in the order the down path made them.
    skips: Vec<Option<Tensor>>,
}

/// A UNet forward pass kept for a backward pass one piece at a time
/// ([`UNet2DConditionModel::forward_saved`]).
pub struct SavedUNet<'a> {
    unet: &'a UNet2DConditionModel,
    temb: Tensor,
    context: Tensor,
    tape: Tape,
}

impl SavedUNet<'_> {
    /// The gradient with respect to the UNet's `sample` of ⟨output, `g`⟩,
    /// in the sample's dtype: each piece recomputed with gradients from its
    /// saved input, last piece first; a skip's gradient (from the up layer
    /// that consumed it) joins the gradient of the piece that made it. The
    /// timestep embedding and the text conditioning are held constant.
    pub fn vjp(self, g: &Tensor) -> Result<Tensor> {
        let SavedUNet { unet, temb, context, tape } = self;
        let Tape { mut steps, mut skips } = tape;
        let mut g_skips: Vec<Option<Tensor>> = (0..skips.len()).map(|_| None).collect();
        let mut g = g.shallow_clone();
        while let Some(step) = steps.pop() {
            if let Some(k) = step.skip_out {
                if let Some(gs) = g_skips[k].take() {
                    g = g + gs;
                }
            }
            let what = format!("UNet backward through {:?}", step.piece);
            match step.skip_in {
                None => {
                    let mut f = |x: &Tensor| unet.piece(step.piece, x, None, &temb, &context);
                    g = crate::nn::vjp(&mut f, &step.input, &g, &what)?;
                }
                Some(k) => {
                    let skip = skips[k].take().expect("each skip is consumed once");
                    let mut f = |x: &[Tensor]| unet.piece(step.piece, &x[0], Some(&x[1]), &temb, &context);
                    let mut grads = crate::nn::vjp_inputs(&mut f, &[&step.input, &skip], &g, &what)?;
                    g_skips[k] = Some(grads.remove(1));
                    g = grads.remove(0);
                }
            }
        }
        Ok(g)
    }
}

fn is_cross_attn(block_type: &str) -> bool {
    block_type_name(block_type).starts_with("CrossAttn")
}

/// The config against the weights' shapes and layer counts, before building:
/// a size or count the weights contradict fails naming the config field
/// (layers the config leaves out would otherwise be silently ignored).
fn check_weights(vb: &Vb, c: &UNetConfig) -> Result<()> {
    let chk = ConfigCheck { vb, file: &c.source };
    let n = c.num_blocks();
    let ch = &c.block_out_channels;
    chk.dim("conv_in.weight", 0, ch[0], "block_out_channels")?;
    chk.dim("conv_in.weight", 1, c.in_channels, "in_channels")?;
    chk.dim("conv_in.weight", 2, c.conv_in_kernel, "conv_in_kernel")?;
    chk.dim("conv_out.weight", 0, c.out_channels, "out_channels")?;
    chk.dim("conv_out.weight", 2, c.conv_out_kernel, "conv_out_kernel")?;
    let temb_field = if c.time_embedding_dim.is_some() { "time_embedding_dim" } else { "block_out_channels" };
    chk.dim("time_embedding.linear_1.weight", 0, c.time_embed_dim(), temb_field)?;
    match c.addition_embed_type {
        Some(_) => {
            chk.dim(
                "add_embedding.linear_1.weight",
                1,
                c.projection_class_embeddings_input_dim.expect("validated"),
                "projection_class_embeddings_input_dim",
            )?;
        }
        None => chk.absent("add_embedding", "addition_embed_type", "null")?,
    }
    chk.count("down_blocks", n as i64, "down_block_types")?;
    chk.count("up_blocks", n as i64, "up_block_types")?;
    let attentions = |block: &str, field: &str, cross: bool, count: i64, i: usize| -> Result<()> {
        let b = format!("{block}.attentions");
        if !cross {
            return chk.absent(&b, field, "a block without attention");
        }
        chk.count(&b, count, if block == "mid_block" { "mid_block_type" } else { "layers_per_block" })?;
        for j in 0..count {
            let a = format!("{b}.{j}");
            chk.count(
                &format!("{a}.transformer_blocks"),
                c.transformer_layers_per_block.get(i),
                "transformer_layers_per_block",
            )?;
            let linear = c.use_linear_projection;
            chk.rank(&format!("{a}.proj_in.weight"), if linear { 2 } else { 4 }, "use_linear_projection", linear)?;
            chk.dim(
                &format!("{a}.transformer_blocks.0.attn2.to_k.weight"),
                1,
                c.cross_attention_dim.get(i),
                "cross_attention_dim",
            )?;
        }
        Ok(())
    };
    for (i, kind) in c.down_block_types.iter().enumerate() {
        let b = format!("down_blocks.{i}");
        chk.count(&format!("{b}.resnets"), c.layers_per_block.get(i), "layers_per_block")?;
        chk.dim(&format!("{b}.resnets.0.conv1.weight"), 0, ch[i], "block_out_channels")?;
        attentions(&b, &format!("down_block_types[{i}]"), is_cross_attn(kind), c.layers_per_block.get(i), i)?;
    }
    match &c.mid_block_type {
        None => chk.absent("mid_block", "mid_block_type", "null")?,
        Some(_) => {
            chk.count("mid_block.resnets", 2, "mid_block_type")?;
            attentions("mid_block", "mid_block_type", true, 1, n - 1)?;
        }
    }
    for (i, kind) in c.up_block_types.iter().enumerate() {
        let mirror = n - 1 - i;
        let b = format!("up_blocks.{i}");
        let layers = c.layers_per_block.get(mirror) + 1;
        chk.count(&format!("{b}.resnets"), layers, "layers_per_block")?;
        chk.dim(&format!("{b}.resnets.0.conv1.weight"), 0, ch[mirror], "block_out_channels")?;
        attentions(&b, &format!("up_block_types[{i}]"), is_cross_attn(kind), layers, mirror)?;
    }
    Ok(())
}
