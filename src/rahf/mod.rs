//! RAHF, the rich-feedback model: ViT + T5 with score, heatmap and keyword heads,
//! in the layout of the public PyTorch reimplementation's checkpoint.
pub mod augment;
pub mod config;
pub mod eval;
pub mod feedback;
pub mod heads;
pub mod import;
pub mod init;
pub mod keywords;
pub mod model;
pub mod preprocess;
pub mod score_kind;
/// The one T5 lives in [`crate::nn::t5`]; RAHF names it here too.
pub use crate::nn::t5;
pub mod tokenizer;
pub mod torch_pickle;
pub mod train;
pub mod vit;

pub use config::{RahfConfig, Variant};
pub use feedback::{check_rahf_dir, Feedback, FeedbackModel, Scores};
pub use model::{PromptBatch, Rahf, RahfOutput};
pub use score_kind::ScoreKind;
