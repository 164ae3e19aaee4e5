//! Diffusion transformers: the MMDiT of Stable Diffusion 3 / 3.5.
pub mod mmdit;
