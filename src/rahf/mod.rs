//! RAHF, the rich-feedback model: ViT + T5 with score, heatmap and keyword heads,
//! in the layout of the public PyTorch reimplementation's checkpoint.
pub mod torch_pickle;
