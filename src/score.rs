//! `orchestrate score`: every given scorer's scores for existing images (RAHF's
//! four with its keywords, and every other scorer instance's), one JSON line
//! per image on stdout, and (with `--out`) heatmap overlays and raw `.npy` maps.
use crate::error::{Error, Result};
use crate::heatmap_io::overlay;
use crate::io::write_npy;
use crate::rahf::Scores;
use crate::scorers::{type_of, RawScores, ScoreSpec, Scored, Scorers};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Debug, Clone)]
pub struct ScoreItem {
    pub image: PathBuf,
    pub prompt: String,
}

/// One output line.
#[derive(Debug, Serialize)]
pub struct ScoreRecord {
    pub image: String,
    pub prompt: String,
    /// RAHF's four scores, keywords and decoded sequence (the instance `rahf`, when given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<Scores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub misaligned_keywords: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
    /// Every scorer instance's raw scores.
    pub raw: RawScores,
    /// The same through each score's fixed normalisation (README, "Scorers").
    pub normalized: RawScores,
    /// With `--score`: the spec and its value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Other instances' extra output (a second RAHF's keywords), by instance.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Each raw score through its type's normalisation.
pub fn normalized(raw: &RawScores) -> RawScores {
    raw.iter()
        .map(|(inst, scores)| {
            let info = type_of(inst).ok();
            let row = scores
                .iter()
                .map(|(name, v)| {
                    let norm = info.and_then(|i| i.score(name)).map(|d| d.normalization);
                    (name.clone(), v.and_then(|v| norm.map(|n| n.apply(v))))
                })
                .collect();
            (inst.clone(), row)
        })
        .collect()
}

fn record(item: &ScoreItem, s: &Scored, spec: Option<&ScoreSpec>) -> ScoreRecord {
    let rahf = s.predictions.get("rahf");
    let text = |v: &serde_json::Value, k: &str| v.get(k).cloned();
    ScoreRecord {
        image: item.image.display().to_string(),
        prompt: item.prompt.clone(),
        scores: crate::scorers::rahf::rahf_scores(&s.raw),
        misaligned_keywords: rahf
            .and_then(|p| text(&p.extra, "misaligned_keywords"))
            .and_then(|v| serde_json::from_value(v).ok()),
        sequence: rahf.and_then(|p| text(&p.extra, "sequence")).and_then(|v| v.as_str().map(str::to_string)),
        raw: s.raw.clone(),
        normalized: normalized(&s.raw),
        score: spec.map(|sp| sp.to_string()),
        value: spec.and_then(|sp| crate::scorers::stored(sp.value(&s.raw))),
        extra: s
            .predictions
            .iter()
            .filter(|(inst, p)| inst.as_str() != "rahf" && !p.extra.is_null())
            .map(|(inst, p)| (inst.clone(), p.extra.clone()))
            .collect(),
    }
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
/// and `<stem>.<heatmap>.npy` (raw, model resolution); `stem` names the
/// scorer instance too when it is not `rahf` (`<stem>.rahf.b.<heatmap>`).
pub fn write_heatmaps(out: &Path, stem: &str, image: &image::RgbImage, heatmaps: &[(&str, Tensor)]) -> Result<()> {
    for (name, map) in heatmaps {
        write_npy(&out.join(format!("{stem}.{name}.npy")), map)?;
        let resized = crate::rahf::preprocess::resize_heatmap(map, image.height() as i64, image.width() as i64);
        let png = out.join(format!("{stem}.{name}.png"));
        let tmp = png.with_extension("png.partial");
        overlay(image, &resized, 0.6)?
            .save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(|e| Error::Image { path: tmp.clone(), reason: e.to_string() })?;
        std::fs::rename(&tmp, &png).map_err(|e| Error::io(&png, e))?;
    }
    Ok(())
}

/// Scores every item with every scorer of `scorers` in batches of
/// `batch_size`, calling `emit` per record in input order; with `spec`, each
/// record carries its value.
pub fn run(
    scorers: &Scorers,
    spec: Option<&ScoreSpec>,
    items: &[ScoreItem],
    batch_size: usize,
    out: Option<&Path>,
    emit: &mut dyn FnMut(&ScoreRecord),
) -> Result<Vec<ScoreRecord>> {
    if items.is_empty() {
        return Err(Error::Invalid("no images to score".into()));
    }
    if scorers.is_empty() {
        return Err(Error::Invalid("no scorer given: --rahf DIR and/or --scorer-model NAME=PATH".into()));
    }
    if let Some(sp) = spec {
        for name in sp.scorers() {
            if scorers.get(&name).is_none() {
                return Err(Error::Invalid(format!("--score `{sp}` uses scorer `{name}`, but {}", crate::scorers::spec::not_given(&name))));
            }
        }
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
        let scored = scorers.predict(imgs, &prompts)?;
        tracing::debug!("batch of {} images in {:.4} s", chunk.len(), batch_started.elapsed().as_secs_f64());
        for (k, (item, s)) in chunk.iter().zip(&scored).enumerate() {
            if let Some(dir) = out {
                let stem = output_stem(&item.image, start + k, &mut taken);
                for (inst, p) in s.predictions.iter().filter(|(_, p)| !p.heatmaps.is_empty()) {
                    let stem = if inst == "rahf" { stem.clone() } else { format!("{stem}.{inst}") };
                    let maps: Vec<(&str, Tensor)> = p.heatmaps.iter().map(|(n, t)| (*n, t.shallow_clone())).collect();
                    write_heatmaps(dir, &stem, &imgs[k], &maps)?;
                }
            }
            let rec = record(item, s, spec);
            emit(&rec);
            records.push(rec);
        }
    }
    tracing::info!("scored {} images in {:.4} s", records.len(), started.elapsed().as_secs_f64());
    Ok(records)
}
