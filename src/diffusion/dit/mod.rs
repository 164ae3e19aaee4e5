//! Diffusion transformers.
pub mod flux;
