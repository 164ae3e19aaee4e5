//! The latent diffusion generators (Stable Diffusion 1.x/2.x and SDXL), read
//! from diffusers' folder layout and weight names, behind one interface
//! ([`generator::Generator`]).
pub mod clip;
pub mod core;
pub mod dit;
pub mod flux;
pub mod generator;
pub mod inpaint;
pub mod lora;
pub mod model_dir;
pub mod noise;
pub mod pipeline;
pub mod schedulers;
pub mod sd3;
pub mod single_file;
pub mod tiny_vae;
pub mod tokenizer;
pub mod unet;
pub mod vae;
