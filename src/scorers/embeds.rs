//! What the CLIP-family scorers share around their towers: checks of the
//! inputs a caller hands them (so a wrong shape or token id is an error naming
//! the model, not a libtorch abort) and the L2 normalisation of embeddings.
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// `pixel_values` must be a floating-point `[B, channels, size, size]` tensor
/// with `B >= 1`, what the model's image processor outputs.
pub fn check_pixel_values(pixel_values: &Tensor, channels: i64, size: i64, model: &str) -> Result<()> {
    let shape = pixel_values.size();
    let ok = shape.len() == 4 && shape[0] >= 1 && shape[1..] == [channels, size, size];
    if !ok || !pixel_values.is_floating_point() {
        return Err(Error::Invalid(format!(
            "{model}: pixel_values must be a float tensor [batch, {channels}, {size}, {size}] \
             (the model's preprocessed images), got {:?} {shape:?}",
            pixel_values.kind()
        )));
    }
    Ok(())
}

/// `input_ids` must be an integer `[B, L]` tensor with `1 <= L <= max_len`
/// and every id in `0..vocab`; `batch`, when given, is the images' batch size
/// it must match (one prompt per image).
pub fn check_input_ids(input_ids: &Tensor, batch: Option<i64>, vocab: i64, max_len: i64, model: &str) -> Result<()> {
    let shape = input_ids.size();
    let integer = matches!(input_ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8);
    if shape.len() != 2 || !integer || shape[0] < 1 || !(1..=max_len).contains(&shape[1]) {
        return Err(Error::Invalid(format!(
            "{model}: input_ids must be an integer tensor [batch, tokens] with 1 to {max_len} tokens, got {:?} {shape:?}",
            input_ids.kind()
        )));
    }
    if let Some(b) = batch {
        if shape[0] != b {
            return Err(Error::Invalid(format!(
                "{model}: {} prompts for {b} images: one prompt per image is expected",
                shape[0]
            )));
        }
    }
    let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
    if lo < 0 || hi >= vocab {
        return Err(Error::Invalid(format!(
            "{model}: token ids range over {lo}..={hi}, outside the {vocab}-token vocabulary"
        )));
    }
    Ok(())
}

/// `x / max(‖x‖₂, 1e-12)` over the last dimension: `torch.nn.functional.normalize`,
/// and for any non-zero embedding exactly the `x / x.norm(dim=-1, keepdim=True)`
/// the PickScore and torchmetrics code write.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
    x / norm.clamp_min(1e-12)
}

/// Cosine similarity of row `i` of `a` with row `i` of `b`: the diagonal of
/// `normalize(a) @ normalize(b).T`, [B].
pub fn paired_cosine(a: &Tensor, b: &Tensor) -> Tensor {
    (l2_normalize(a) * l2_normalize(b)).sum_dim_intlist([-1i64].as_slice(), false, None)
}
