//! Raw point annotations -> heatmaps, as RichHF-18K was made (paper §3.2): each
//! marked point stands for a disk of radius 1/20 of the image height; each
//! annotator's points make a binary map (the union of their disks), and the
//! heatmap is the mean of the annotators' maps. An annotator who marked nothing
//! contributes an all-zero map, which still counts in the mean, so with three
//! annotators the values are 0, 1/3, 2/3 and 1.
//!
//! A pixel (row i, column j) is inside the disk of a point (x, y) when its centre
//! (j + 0.5, i + 0.5) is within the radius (boundary included); points are in the
//! pixel coordinates of the annotated image, x to the right, y down, the image
//! covering [0, width] x [0, height].
//!
//! # Points file (for users who collect their own feedback)
//!
//! JSON Lines, one image per line (blank lines are skipped, other fields ignored):
//!
//! ```json
//! {"filename": "0001.png", "height": 512, "width": 512,
//!  "artifact_points": [[[10.5, 20], [300, 41.25]], [], [[12, 19]]],
//!  "misalignment_points": [[], [[100, 100]], []]}
//! ```
//!
//! `artifact_points` and `misalignment_points` hold one list per annotator (at
//! least one annotator each) of `[x, y]` points. [`convert_points_file`] writes
//! `<stem>_artifact_map.png` and `<stem>_misalignment_map.png` (8-bit grayscale,
//! `round(v * 255)`, `height` x `width`) for each line, `<stem>` being the
//! filename's stem. A point outside the image, a size of 0, a line without
//! annotators, or two lines with one stem are errors naming the line.
use crate::error::{Error, Result};
use crate::richhf::Heatmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The binary map (0 or 1) of the union of the disks of `radius` around `points`.
pub fn disk_map(points: &[(f32, f32)], height: usize, width: usize, radius: f32) -> Heatmap {
    let mut map = Heatmap::zeros(height, width);
    let r = radius as f64;
    if r.is_nan() || r < 0.0 {
        return map;
    }
    for &(x, y) in points {
        let (x, y) = (x as f64, y as f64);
        // Only the disk's bounding box can hold pixels whose centre is inside.
        let lo = |c: f64| (c - r - 0.5).floor().max(0.0) as usize;
        let hi = |c: f64, n: usize| ((c + r - 0.5).ceil().max(-1.0) + 1.0).min(n as f64) as usize;
        for i in lo(y)..hi(y, height) {
            let dy = i as f64 + 0.5 - y;
            for j in lo(x)..hi(x, width) {
                let dx = j as f64 + 0.5 - x;
                if dx * dx + dy * dy <= r * r {
                    map.data[i * width + j] = 1.0;
                }
            }
        }
    }
    map
}

/// The mean over annotators of their disk maps, radius `height / 20`. No
/// annotators gives an all-zero map ([`convert_points_file`] rejects that).
pub fn average_annotators(annotators: &[Vec<(f32, f32)>], height: usize, width: usize) -> Heatmap {
    let mut sum = Heatmap::zeros(height, width);
    if annotators.is_empty() {
        return sum;
    }
    let radius = (height as f64 / 20.0) as f32;
    for points in annotators {
        let m = disk_map(points, height, width, radius);
        sum.data.iter_mut().zip(&m.data).for_each(|(s, v)| *s += v);
    }
    let n = annotators.len() as f32;
    sum.data.iter_mut().for_each(|s| *s /= n);
    sum
}


#[derive(serde::Deserialize)]
struct PointsRecord {
    filename: String,
    height: usize,
    width: usize,
    artifact_points: Vec<Vec<[f32; 2]>>,
    misalignment_points: Vec<Vec<[f32; 2]>>,
}

/// What [`convert_points_file`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PointsReport {
    /// Images (non-blank lines) converted.
    pub images: usize,
    /// Points read, over all images, annotators and both maps.
    pub points: usize,
    /// The PNGs written, two per image, in file order.
    pub written: Vec<PathBuf>,
}

/// Converts a points file (format in the module doc) to heatmap PNGs in
/// `out_dir` (created if missing). Every line is checked before anything is
/// written, so a bad file leaves no partial output.
pub fn convert_points_file(jsonl: &Path, out_dir: &Path) -> Result<PointsReport> {
    let text = std::fs::read_to_string(jsonl).map_err(|e| Error::io(jsonl, e))?;
    let err = |line: usize, reason: String| Error::data(jsonl, None, format!("line {line}: {reason}"));
    let mut jobs = Vec::new();
    let mut stems: HashMap<String, usize> = HashMap::new();
    let mut points = 0;
    for (k, raw) in text.lines().enumerate() {
        let line = k + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let rec: PointsRecord =
            serde_json::from_str(raw).map_err(|e| err(line, format!("invalid JSON: {e}")))?;
        if rec.height == 0 || rec.width == 0 {
            return Err(err(
                line,
                format!("image size {}x{} is empty", rec.width, rec.height),
            ));
        }
        let stem = Path::new(&rec.filename)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                err(
                    line,
                    format!("filename {:?} has no stem to name the maps", rec.filename),
                )
            })?;
        if let Some(first) = stems.insert(stem.clone(), line) {
            return Err(err(
                line,
                format!("filename stem {stem:?} was already used on line {first}"),
            ));
        }
        let mut maps = Vec::with_capacity(2);
        for (field, annotators) in [
            ("artifact_points", &rec.artifact_points),
            ("misalignment_points", &rec.misalignment_points),
        ] {
            if annotators.is_empty() {
                return Err(err(line, format!("{field} has no annotators")));
            }
            let (w, h) = (rec.width as f32, rec.height as f32);
            for (a, pts) in annotators.iter().enumerate() {
                for (p, &[x, y]) in pts.iter().enumerate() {
                    if !(0.0..=w).contains(&x) || !(0.0..=h).contains(&y) {
                        return Err(err(
                            line,
                            format!(
                                "{field}[{a}][{p}] = [{x}, {y}] is outside the {}x{} image",
                                rec.width, rec.height
                            ),
                        ));
                    }
                }
                points += pts.len();
            }
            let pts: Vec<Vec<(f32, f32)>> = annotators
                .iter()
                .map(|a| a.iter().map(|&[x, y]| (x, y)).collect())
                .collect();
            maps.push((field, pts));
        }
        jobs.push((stem, rec.height, rec.width, maps));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut written = Vec::with_capacity(jobs.len() * 2);
    for (stem, height, width, maps) in &jobs {
        for (field, annotators) in maps {
            let kind = if *field == "artifact_points" {
                "artifact"
            } else {
                "misalignment"
            };
            let path = out_dir.join(format!("{stem}_{kind}_map.png"));
            crate::io::save_gray(&path, &average_annotators(annotators, *height, *width).to_gray())?;
            written.push(path);
        }
    }
    Ok(PointsReport {
        images: jobs.len(),
        points,
        written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_disk_is_symmetric_and_bounded() {
        let m = disk_map(&[(5.0, 5.0)], 10, 10, 1.0);
        // Centres at distance sqrt(0.5) are inside, the next ring (sqrt(2.5)) is not.
        let inside: Vec<usize> = (0..100).filter(|&k| m.data[k] == 1.0).collect();
        assert_eq!(inside, vec![44, 45, 54, 55]);
        assert!(disk_map(&[], 3, 4, 2.0).data.iter().all(|&v| v == 0.0));
        assert!(disk_map(&[(1.0, 1.0)], 3, 4, f32::NAN)
            .data
            .iter()
            .all(|&v| v == 0.0));
        // A disk entirely outside the image marks nothing and does not panic.
        assert!(disk_map(&[(-50.0, 80.0)], 3, 4, 2.0)
            .data
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn empty_annotator_counts_in_the_mean() {
        let m = average_annotators(&[vec![(2.0, 2.0)], vec![]], 20, 20);
        assert_eq!(m.data[2 * 20 + 2], 0.5);
        assert_eq!(m.data[19 * 20 + 19], 0.0);
        assert!(average_annotators(&[], 2, 2).data.iter().all(|&v| v == 0.0));
    }
}
