//! `orchestrate score`: RAHF feedback for existing images, one JSON line per
//! image on stdout, and (with `--out`) heatmap overlays and raw `.npy` maps.
use crate::error::{Error, Result};
use crate::heatmap_io::overlay;
use crate::io::write_npy;
use crate::rahf::{Feedback, FeedbackModel, Scores};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ScoreItem {
    pub image: PathBuf,
    pub prompt: String,
}

#[derive(Debug, Serialize)]
pub struct ScoreRecord {
    pub image: String,
    pub prompt: String,
    pub scores: Scores,
    pub misaligned_keywords: Vec<String>,
    pub sequence: String,
}

/// Reads `{"image": PATH, "prompt": TEXT}` lines (also accepts `file_name`/`text`,
/// the imagefolder names); relative image paths are taken from the manifest's folder.
pub fn read_manifest(path: &Path) -> Result<Vec<ScoreItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Invalid(format!("{}:{}: invalid JSON: {e}", path.display(), n + 1)))?;
        let field = |names: &[&str]| names.iter().find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_string));
        let image = field(&["image", "file_name", "file"]).ok_or_else(|| {
            Error::Invalid(format!("{}:{}: no `image` (or `file_name`) field", path.display(), n + 1))
        })?;
        let prompt = field(&["prompt", "text"])
            .ok_or_else(|| Error::Invalid(format!("{}:{}: no `prompt` (or `text`) field", path.display(), n + 1)))?;
        items.push(ScoreItem { image: base.join(image), prompt });
    }
    Ok(items)
}

fn output_stem(image: &Path, index: usize, taken: &mut std::collections::HashSet<String>) -> String {
    let stem = image.file_stem().and_then(|s| s.to_str()).unwrap_or("image").to_string();
    // Two inputs with the same file name (from different folders) must not
    // overwrite each other's outputs.
    if taken.insert(stem.clone()) {
        stem
    } else {
        let unique = format!("{stem}-{index}");
        taken.insert(unique.clone());
        unique
    }
}

/// Writes, for one image, `<stem>.<heatmap>.png` (overlay at the image's size)
/// and `<stem>.<heatmap>.npy` (raw, model resolution).
pub fn write_heatmaps(out: &Path, stem: &str, image: &image::RgbImage, fb: &Feedback) -> Result<()> {
    for (name, map) in [("implausibility", &fb.implausibility_heatmap), ("misalignment", &fb.misalignment_heatmap)] {
        write_npy(&out.join(format!("{stem}.{name}.npy")), map)?;
        let resized = fb.heatmap_at(name, image.width(), image.height())?;
        let png = out.join(format!("{stem}.{name}.png"));
        let tmp = png.with_extension("png.partial");
        overlay(image, &resized, 0.6)?
            .save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(|e| Error::Image { path: tmp.clone(), reason: e.to_string() })?;
        std::fs::rename(&tmp, &png).map_err(|e| Error::io(&png, e))?;
    }
    Ok(())
}

/// Scores every item in batches of `batch_size`, calling `emit` per record in input order.
pub fn run(
    model: &FeedbackModel,
    items: &[ScoreItem],
    batch_size: usize,
    out: Option<&Path>,
    emit: &mut dyn FnMut(&ScoreRecord),
) -> Result<Vec<ScoreRecord>> {
    if items.is_empty() {
        return Err(Error::Invalid("no images to score".into()));
    }
    // Every image is opened before any work, so a bad file fails fast.
    let images: Vec<image::RgbImage> = items.iter().map(|it| crate::io::load_rgb(&it.image)).collect::<Result<_>>()?;
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut taken = std::collections::HashSet::new();
    let mut records = Vec::new();
    let batch_size = batch_size.max(1);
    // Model time without process start-up and loading (scripts/bench/rahf.py reads these lines).
    let started = std::time::Instant::now();
    for (chunk_idx, chunk) in items.chunks(batch_size).enumerate() {
        let start = chunk_idx * batch_size;
        let imgs = &images[start..start + chunk.len()];
        let prompts: Vec<String> = chunk.iter().map(|it| it.prompt.clone()).collect();
        let batch_started = std::time::Instant::now();
        let feedback = model.predict(imgs, &prompts)?;
        tracing::debug!("batch of {} images in {:.4} s", chunk.len(), batch_started.elapsed().as_secs_f64());
        for (k, (item, fb)) in chunk.iter().zip(&feedback).enumerate() {
            if let Some(dir) = out {
                let stem = output_stem(&item.image, start + k, &mut taken);
                write_heatmaps(dir, &stem, &imgs[k], fb)?;
            }
            let rec = ScoreRecord {
                image: item.image.display().to_string(),
                prompt: item.prompt.clone(),
                scores: fb.scores,
                misaligned_keywords: fb.misaligned_keywords.clone(),
                sequence: fb.sequence.clone(),
            };
            emit(&rec);
            records.push(rec);
        }
    }
    tracing::info!("scored {} images in {:.4} s", records.len(), started.elapsed().as_secs_f64());
    Ok(records)
}
