//! diffusers' `UNet2DConditionModel` (the Stable Diffusion denoiser), built
//! from `unet/config.json` and loaded from the `unet/` weights by their
//! diffusers names. The files mirror the checkpoint's nesting: `model.rs`
//! (top level), `blocks.rs` (`down_blocks`, `mid_block`, `up_blocks`),
//! `resnet.rs`, `attention.rs` (`attentions.*`), `embeddings.rs` (`time_embedding`).
pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod model;
pub mod resnet;

pub use config::UNetConfig;
pub use model::{AddedCond, SavedUNet, Timesteps, UNet2DConditionModel};
