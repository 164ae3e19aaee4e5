//! The CLIP-family scorer models (issue 14): standalone models that take
//! preprocessed `pixel_values` and token ids and return one score per
//! (image, prompt), differentiable w.r.t. the pixels.
pub mod aesthetic;
pub mod clip;
pub mod embeds;
pub mod hps;
pub mod open_clip;
pub mod open_clip_tokenizer;
mod text_clean_tables;
