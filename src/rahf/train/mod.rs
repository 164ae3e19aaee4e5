//! Training RAHF (§4.1.3, Supp. §9): losses, AdamW with warm-up and
//! reciprocal-square-root decay, gradient accumulation, augmentation,
//! checkpoints with exact resume, validation on `dev`, loss curves.
pub mod batch;
pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod trainer;
pub mod validate;

pub use trainer::{train, Hyperparameters, TrainOptions, TrainSummary};
