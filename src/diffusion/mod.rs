//! The latent diffusion generator (Stable Diffusion family), read from
//! diffusers' folder layout and weight names.
pub mod clip;
pub mod core;
pub mod inpaint;
pub mod model_dir;
pub mod noise;
pub mod pipeline;
pub mod schedulers;
pub mod tokenizer;
pub mod unet;
pub mod vae;
