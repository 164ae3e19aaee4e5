//! orchestrate: rich human feedback (RAHF) for text-to-image generation.
pub mod device;
pub mod diffusion;
pub mod env_report;
pub mod error;
pub mod finetune;
pub mod generate;
pub mod guidance;
pub mod heatmap_io;
pub mod io;
pub mod jobs;
pub mod json;
pub mod mask;
pub mod metrics;
pub mod nn;
pub mod perf;
pub mod progress;
pub mod rahf;
pub mod recipe;
pub mod report;
pub mod richhf;
pub mod rng;
pub mod score;
pub mod scorers;
pub mod weights;

pub use error::{Error, Result};
