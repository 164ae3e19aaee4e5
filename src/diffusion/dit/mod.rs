//! Diffusion transformers: the MMDiT of Stable Diffusion 3 / 3.5 and FLUX's.
pub mod flux;
pub mod mmdit;
