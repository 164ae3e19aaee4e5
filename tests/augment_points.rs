//! RAHF training augmentation (Supp. §9) and point annotations -> heatmaps (§3.2),
//! checked against tests/fixtures/points/cases.json (colorsys / numpy references,
//! made by tests/fixtures/points/make_fixtures.py) and against their definitions.
use image::RgbImage;
use orchestrate::rahf::augment::{self, AugmentConfig, CropBox};
use orchestrate::richhf::points::{average_annotators, convert_points_file, disk_map};
use orchestrate::richhf::Heatmap;
use orchestrate::rng::Rng;
use serde_json::Value;

fn cases() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/points/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn fixture_image(c: &Value) -> RgbImage {
    let im = &c["image"];
    let px: Vec<u8> = im["pixels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    RgbImage::from_raw(
        im["width"].as_u64().unwrap() as u32,
        im["height"].as_u64().unwrap() as u32,
        px,
    )
    .unwrap()
}

/// Each u8 output is the rounding of the reference's float: within half a level
/// (plus float noise), so a wrong op or a missing clamp fails.
fn assert_rounds(out: &RgbImage, expected: &[f64], what: &str) {
    assert_eq!(out.as_raw().len(), expected.len(), "{what}");
    for (k, (&o, &e)) in out.as_raw().iter().zip(expected).enumerate() {
        assert!(
            (o as f64 - e * 255.0).abs() <= 0.5 + 1e-3,
            "{what}: value {k} is {o}, expected {}",
            e * 255.0
        );
    }
}

fn zeros2(h: usize, w: usize) -> [Heatmap; 2] {
    [Heatmap::zeros(h, w), Heatmap::zeros(h, w)]
}

fn textured(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut r = Rng::new(seed);
    RgbImage::from_fn(w, h, |x, y| {
        let n = r.below(40) as u32;
        image::Rgb([
            ((x * 7 + n) % 256) as u8,
            ((y * 5 + 2 * n) % 256) as u8,
            ((x * y + 90) % 256) as u8,
        ])
    })
}

// ------------------------------------------------------------------ colour ops

#[test]
fn hsv_matches_colorsys() {
    let c = cases();
    let img = fixture_image(&c);
    for (k, (p, hsv)) in img.pixels().zip(c["hsv"].as_array().unwrap()).enumerate() {
        let rgb = [p[0] as f32 / 255.0, p[1] as f32 / 255.0, p[2] as f32 / 255.0];
        let got = augment::rgb_to_hsv(rgb);
        let want = floats(hsv);
        let dh = (got[0] as f64 - want[0]).abs();
        assert!(
            dh.min(1.0 - dh) < 1e-5,
            "pixel {k}: hue {} vs {}",
            got[0],
            want[0]
        );
        assert!(
            (0.0..1.0).contains(&got[0]),
            "pixel {k}: hue {} outside [0, 1)",
            got[0]
        );
        assert!(
            (got[1] as f64 - want[1]).abs() < 1e-5 && (got[2] as f64 - want[2]).abs() < 1e-6,
            "pixel {k}"
        );
        let back = augment::hsv_to_rgb([want[0] as f32, want[1] as f32, want[2] as f32]);
        (0..3).for_each(|ch| {
            assert!(
                (back[ch] - rgb[ch]).abs() < 1e-5,
                "pixel {k}: {back:?} vs {rgb:?}"
            )
        });
    }
}

#[test]
fn hue_and_saturation_match_colorsys() {
    let c = cases();
    let img = fixture_image(&c);
    for case in c["hue"].as_array().unwrap() {
        let d = case["delta"].as_f64().unwrap() as f32;
        assert_rounds(
            &augment::adjust_hue(&img, d),
            &floats(&case["expected"]),
            &format!("hue {d}"),
        );
    }
    for case in c["saturation"].as_array().unwrap() {
        let f = case["factor"].as_f64().unwrap() as f32;
        assert_rounds(
            &augment::adjust_saturation(&img, f),
            &floats(&case["expected"]),
            &format!("saturation {f}"),
        );
    }
}

#[test]
fn brightness_contrast_grayscale_match_tf_arithmetic() {
    let c = cases();
    let img = fixture_image(&c);
    for case in c["brightness"].as_array().unwrap() {
        let d = case["delta"].as_f64().unwrap() as f32;
        assert_rounds(
            &augment::adjust_brightness(&img, d),
            &floats(&case["expected"]),
            &format!("brightness {d}"),
        );
    }
    for case in c["contrast"].as_array().unwrap() {
        let f = case["factor"].as_f64().unwrap() as f32;
        assert_rounds(
            &augment::adjust_contrast(&img, f),
            &floats(&case["expected"]),
            &format!("contrast {f}"),
        );
    }
    let gray = augment::to_grayscale(&img);
    assert_rounds(&gray, &floats(&c["grayscale"]), "grayscale");
    assert!(gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    // Written out: pure green is 0.587 * 255 = 149.685 -> 150 with TF's weights.
    let g = augment::to_grayscale(&RgbImage::from_pixel(1, 1, image::Rgb([0, 255, 0])));
    assert_eq!(g.get_pixel(0, 0).0, [150, 150, 150]);
}

#[test]
fn jpeg_roundtrip_is_mild_noise() {
    // A smooth image with an edge, like a photo, not white noise.
    let img = RgbImage::from_fn(96, 64, |x, y| {
        let inside = (x as i32 - 40).pow(2) + (y as i32 - 30).pow(2) < 400;
        let base = if inside { 200 } else { 40 };
        image::Rgb([
            (base + x / 2) as u8,
            (base / 2 + y) as u8,
            (120 + (x + y) / 4) as u8,
        ])
    });
    let psnr = |a: &RgbImage, b: &RgbImage| {
        let mse = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(&p, &q)| (p as f64 - q as f64).powi(2))
            .sum::<f64>()
            / a.as_raw().len() as f64;
        10.0 * (255.0f64 * 255.0 / mse).log10()
    };
    let q70 = augment::jpeg_roundtrip(&img, 70);
    let q100 = augment::jpeg_roundtrip(&img, 100);
    assert_eq!(q70.dimensions(), img.dimensions());
    assert_ne!(q70, img, "JPEG at quality 70 left the image untouched");
    let (p70, p100) = (psnr(&img, &q70), psnr(&img, &q100));
    assert!(p70 > 25.0, "PSNR at q70 = {p70:.1} dB");
    assert!(
        p100 > p70,
        "q100 ({p100:.1} dB) is not closer than q70 ({p70:.1} dB)"
    );
}

// ------------------------------------------------------------------ crop

#[test]
fn crop_keeps_image_and_heatmaps_aligned() {
    // Image 768 x 600, heatmaps 512 x 480: other resolutions, other aspect ratios.
    // A block at relative columns [0.25, 0.375), rows [0.25, 0.5) in all three.
    let (iw, ih, hw, hh) = (768usize, 600usize, 512usize, 480usize);
    let in_block =
        |x: usize, y: usize, w: usize, h: usize| 4 * x >= w && 8 * x < 3 * w && 4 * y >= h && 2 * y < h;
    let img = RgbImage::from_fn(iw as u32, ih as u32, |x, y| {
        if in_block(x as usize, y as usize, iw, ih) {
            image::Rgb([250, 250, 250])
        } else {
            image::Rgb([5, 5, 5])
        }
    });
    let map = |v: f32| {
        let data = (0..hh * hw)
            .map(|k| if in_block(k % hw, k / hw, hw, hh) { v } else { 0.0 })
            .collect();
        Heatmap {
            height: hh,
            width: hw,
            data,
        }
    };
    let maps = [map(1.0), map(0.5)];
    let cfg = AugmentConfig {
        crop_prob: 1.0,
        ..AugmentConfig::none()
    };
    // The block's first and one-past-last column and row, and the grid's size.
    fn bbox(w: usize, h: usize, on: impl Fn(usize, usize) -> bool) -> [f64; 6] {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..h {
            for x in 0..w {
                if on(x, y) {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
                }
            }
        }
        [x0 as f64, y0 as f64, x1 as f64, y1 as f64, w as f64, h as f64]
    }
    let mut rng = Rng::new(11);
    let mut sizes = std::collections::HashSet::new();
    for _ in 0..60 {
        let (ci, [m0, m1]) = augment::augment(&img, &maps, &cfg, &mut rng);
        assert_eq!((m0.height, m0.width), (m1.height, m1.width));
        assert_eq!(m0.data.iter().map(|v| v * 0.5).collect::<Vec<_>>(), m1.data);
        sizes.insert(ci.dimensions());
        let a = bbox(ci.width() as usize, ci.height() as usize, |x, y| {
            ci.get_pixel(x as u32, y as u32)[0] > 128
        });
        let b = bbox(m0.width, m0.height, |x, y| m0.data[y * m0.width + x] > 0.5);
        // Both crops must be the same relative window: every block edge, taken to
        // the heatmap's grid, agrees to within a heatmap pixel.
        for k in 0..4 {
            let (ga, gb) = (a[4 + k % 2], b[4 + k % 2]);
            let edge_a = a[k] / ga * gb;
            assert!(
                (edge_a - b[k]).abs() <= 1.0,
                "edge {k}: image {a:?} vs heatmap {b:?}"
            );
        }
        // The relative crop size is the same too.
        assert!((a[4] / iw as f64 - b[4] / hw as f64).abs() <= 1.0 / hw as f64 + 1.0 / iw as f64);
        assert!((a[5] / ih as f64 - b[5] / hh as f64).abs() <= 1.0 / hh as f64 + 1.0 / ih as f64);
    }
    assert!(sizes.len() > 50, "crops do not vary: {sizes:?}");
}

#[test]
fn crop_fractions_stay_in_bounds() {
    let mut rng = Rng::new(5);
    let boxes: Vec<CropBox> = (0..5000).map(|_| augment::crop_box(0.8, 1.0, &mut rng)).collect();
    for b in &boxes {
        assert!((0.8..=1.0).contains(&b.w) && (0.8..=1.0).contains(&b.h), "{b:?}");
        assert!(
            b.x >= 0.0 && b.y >= 0.0 && b.x + b.w <= 1.0 + 1e-12 && b.y + b.h <= 1.0 + 1e-12,
            "{b:?}"
        );
    }
    let ws: Vec<f64> = boxes.iter().map(|b| b.w).collect();
    let hs: Vec<f64> = boxes.iter().map(|b| b.h).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mw, mh) = (mean(&ws), mean(&hs));
    assert!((mw - 0.9).abs() < 0.005 && (mh - 0.9).abs() < 0.005, "{mw} {mh}");
    assert!(ws.iter().cloned().fold(1.0, f64::min) < 0.801 && ws.iter().cloned().fold(0.0, f64::max) > 0.999);
    // Width and height are drawn independently.
    let cov = ws.iter().zip(&hs).map(|(w, h)| (w - mw) * (h - mh)).sum::<f64>() / ws.len() as f64;
    assert!(
        cov.abs() / (0.2f64.powi(2) / 12.0) < 0.05,
        "width and height correlate: {cov}"
    );
    // The placement covers the whole slack, not one corner.
    let slack: Vec<f64> = boxes.iter().map(|b| b.x / (1.0 - b.w)).collect();
    assert!((mean(&slack) - 0.5).abs() < 0.02);

    // Through `augment`: a 100 x 50 image comes out 80..=100 x 40..=50.
    let cfg = AugmentConfig {
        crop_prob: 1.0,
        ..AugmentConfig::none()
    };
    let img = textured(100, 50, 1);
    let mut rng = Rng::new(6);
    for _ in 0..500 {
        let (out, maps) = augment::augment(&img, &zeros2(25, 40), &cfg, &mut rng);
        let (w, h) = out.dimensions();
        assert!((80..=100).contains(&w) && (40..=50).contains(&h), "{w}x{h}");
        assert!((20..=25).contains(&maps[0].height) && (32..=40).contains(&maps[0].width));
    }
}

// ------------------------------------------------------------------ augment

#[test]
fn none_config_is_the_identity() {
    let img = textured(33, 17, 2);
    let maps = [
        Heatmap {
            height: 5,
            width: 7,
            data: (0..35).map(|k| k as f32 / 35.0).collect(),
        },
        Heatmap {
            height: 5,
            width: 7,
            data: (0..35).map(|k| 1.0 - k as f32 / 35.0).collect(),
        },
    ];
    let mut rng = Rng::new(3);
    for _ in 0..20 {
        let (out, m) = augment::augment(&img, &maps, &AugmentConfig::none(), &mut rng);
        assert_eq!(out, img);
        assert_eq!(m, maps);
    }
}

#[test]
fn probabilities_are_respected() {
    let img = textured(16, 16, 4);
    let maps = zeros2(8, 8);
    let n = 3000;
    let rate = |cfg: AugmentConfig, hit: &dyn Fn(&RgbImage) -> bool| {
        let mut rng = Rng::new(9);
        (0..n)
            .filter(|_| hit(&augment::augment(&img, &maps, &cfg, &mut rng).0))
            .count() as f64
            / n as f64
    };
    // A half-size crop always changes the size.
    let crop = AugmentConfig {
        crop_prob: 0.5,
        crop_min: 0.5,
        crop_max: 0.5,
        ..AugmentConfig::none()
    };
    let r = rate(crop, &|o| o.dimensions() != (16, 16));
    assert!((r - 0.5).abs() < 0.03, "crop rate {r}");
    // The colour version (with its JPEG noise) always differs from this texture.
    let color = AugmentConfig {
        color_prob: 0.1,
        ..AugmentConfig::none()
    };
    let r = rate(color, &|o| o != &img);
    assert!((r - 0.1).abs() < 0.02, "colour rate {r}");
    let gray = AugmentConfig {
        grayscale_prob: 0.1,
        ..AugmentConfig::none()
    };
    let r = rate(gray, &|o| o.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    assert!((r - 0.1).abs() < 0.02, "grayscale rate {r}");
    // With the paper's settings all three happen, and about as often.
    let cfg = AugmentConfig::default();
    let mut rng = Rng::new(10);
    let (mut cropped, mut grayed) = (0, 0);
    for _ in 0..n {
        let (o, m) = augment::augment(&img, &maps, &cfg, &mut rng);
        cropped += (o.dimensions() != (16, 16)) as usize;
        grayed += o.pixels().all(|p| p[0] == p[1] && p[1] == p[2]) as usize;
        assert!(m[0].height <= 8 && m[0].height >= 6);
    }
    // A crop can round back to the full 16 px only when both fractions are >= 0.97.
    let (rc, rg) = (cropped as f64 / n as f64, grayed as f64 / n as f64);
    assert!(rc > 0.45 && rc < 0.52, "paper crop rate {rc}");
    assert!((rg - 0.1).abs() < 0.02, "paper grayscale rate {rg}");
}

#[test]
fn draws_come_only_from_rng_and_are_fixed_in_number() {
    let img = textured(24, 20, 7);
    let maps = zeros2(12, 10);
    let cfg = AugmentConfig {
        color_prob: 0.5,
        grayscale_prob: 0.3,
        ..Default::default()
    };
    let run = |seed| {
        let mut rng = Rng::new(seed);
        (0..30)
            .map(|_| augment::augment(&img, &maps, &cfg, &mut rng))
            .collect::<Vec<_>>()
    };
    let (a, b) = (run(42), run(42));
    assert!(a.iter().zip(&b).all(|(x, y)| x.0 == y.0 && x.1 == y.1));
    assert!(a.iter().zip(run(43)).any(|(x, y)| x.0 != y.0));
    // Twelve draws per call, whatever happens, so one setting does not shift the others.
    for cfg in [AugmentConfig::default(), AugmentConfig::none(), cfg.clone()] {
        let (mut r1, mut r2) = (Rng::new(8), Rng::new(8));
        augment::augment(&img, &maps, &cfg, &mut r1);
        (0..12).for_each(|_| {
            r2.next_u64();
        });
        assert_eq!(r1, r2);
    }
}

// ------------------------------------------------------------------ points

#[test]
fn disk_area_is_pi_r_squared() {
    for (r, x, y) in [
        (20.0f32, 100.3f32, 99.7f32),
        (35.5, 120.0, 80.25),
        (7.25, 50.5, 60.0),
    ] {
        let m = disk_map(&[(x, y)], 200, 240, r);
        let area = m.data.iter().sum::<f32>() as f64;
        let want = std::f64::consts::PI * (r as f64).powi(2);
        assert!((area - want).abs() / want < 0.02, "r {r}: {area} vs {want}");
        assert!(m.data.iter().all(|&v| v == 0.0 || v == 1.0));
    }
}

#[test]
fn three_annotators_average_to_thirds() {
    let mut rng = Rng::new(12);
    let annotators: Vec<Vec<(f32, f32)>> = (0..3)
        .map(|_| {
            (0..6)
                .map(|_| (rng.range(0.0, 90.0) as f32, rng.range(0.0, 60.0) as f32))
                .collect()
        })
        .collect();
    let m = average_annotators(&annotators, 60, 90);
    let mut seen = [false; 4];
    for &v in &m.data {
        let k = (v * 3.0).round();
        assert!((v * 3.0 - k).abs() < 1e-6, "{v} is not a third");
        seen[k as usize] = true;
    }
    assert!(seen[0] && seen[1], "{seen:?}");
    // The disks are radius 60 / 20 = 3: each annotator's mean map is their own disk map.
    let one = disk_map(&annotators[0], 60, 90, 3.0);
    let alone = average_annotators(&annotators[..1], 60, 90);
    assert_eq!(one, alone);
}

fn digits(rows: &Value) -> Vec<u32> {
    rows.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_str()
                .unwrap()
                .chars()
                .map(|c| c.to_digit(10).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn points_of(v: &Value) -> Vec<(f32, f32)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_f64().unwrap() as f32, p[1].as_f64().unwrap() as f32))
        .collect()
}

#[test]
fn disks_match_numpy() {
    let c = cases();
    let d = &c["disk"];
    let (h, w) = (
        d["height"].as_u64().unwrap() as usize,
        d["width"].as_u64().unwrap() as usize,
    );
    let m = disk_map(
        &points_of(&d["points"]),
        h,
        w,
        d["radius"].as_f64().unwrap() as f32,
    );
    let want: Vec<f32> = digits(&d["inside"]).into_iter().map(|v| v as f32).collect();
    assert_eq!(m.data, want);

    let a = &c["average"];
    let (h, w) = (
        a["height"].as_u64().unwrap() as usize,
        a["width"].as_u64().unwrap() as usize,
    );
    let annotators: Vec<Vec<(f32, f32)>> = a["annotators"]
        .as_array()
        .unwrap()
        .iter()
        .map(points_of)
        .collect();
    let n = annotators.len() as f32;
    let m = average_annotators(&annotators, h, w);
    let want: Vec<f32> = digits(&a["counts"]).into_iter().map(|v| v as f32 / n).collect();
    assert_eq!((m.height, m.width), (h, w));
    assert_eq!(m.data, want);
}

#[test]
fn points_file_converts_to_pngs() {
    let c = cases();
    let a = &c["average"];
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("points.jsonl");
    let line1 = serde_json::json!({
        "filename": "imgs/sample_one.png", "height": a["height"], "width": a["width"],
        "artifact_points": a["annotators"], "misalignment_points": [[], [[3, 4]], []],
        "prompt": "extra fields are ignored",
    });
    let line2 = r#"{"filename": "two.jpg", "height": 40, "width": 20, "artifact_points": [[]], "misalignment_points": [[[20, 40]]]}"#;
    std::fs::write(&jsonl, format!("{line1}\n\n{line2}\n")).unwrap();
    let out = dir.path().join("maps");
    let report = convert_points_file(&jsonl, &out).unwrap();
    assert_eq!(report.images, 2);
    let n_points: usize = a["annotators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_array().unwrap().len())
        .sum();
    assert_eq!(report.points, n_points + 1 + 1);
    let names: Vec<String> = report
        .written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "sample_one_artifact_map.png",
            "sample_one_misalignment_map.png",
            "two_artifact_map.png",
            "two_misalignment_map.png"
        ]
    );
    let art = image::open(out.join("sample_one_artifact_map.png"))
        .unwrap()
        .to_luma8();
    assert_eq!(
        art.dimensions(),
        (
            a["width"].as_u64().unwrap() as u32,
            a["height"].as_u64().unwrap() as u32
        )
    );
    let n = a["annotators"].as_array().unwrap().len() as f64;
    let want: Vec<u8> = digits(&a["counts"])
        .into_iter()
        .map(|k| (k as f64 / n * 255.0).round() as u8)
        .collect();
    assert_eq!(art.as_raw(), &want);
    let mis = image::open(out.join("sample_one_misalignment_map.png"))
        .unwrap()
        .to_luma8();
    assert_eq!(
        mis.get_pixel(3, 3)[0],
        85,
        "one of three annotators -> round(255 / 3)"
    );
    assert_eq!(mis.get_pixel(40, 40)[0], 0);
    let two = image::open(out.join("two_misalignment_map.png"))
        .unwrap()
        .to_luma8();
    // A point on the corner (20, 40) covers the corner pixel: radius 40 / 20 = 2.
    assert_eq!(
        (two.dimensions(), two.get_pixel(19, 39)[0], two.get_pixel(0, 0)[0]),
        ((20, 40), 255, 0)
    );
    assert_eq!(
        Heatmap {
            height: 1,
            width: 2,
            data: vec![0.5, 2.0]
        }
        .to_gray()
        .as_raw(),
        &[128, 255]
    );
}

#[test]
fn points_file_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"filename": "a.png", "height": 10, "width": 20, "artifact_points": [[[1, 2]]], "misalignment_points": [[]]}"#;
    let cases = [
        ("{not json", "line 2: invalid JSON"),
        (
            r#"{"filename": "b.png", "height": 10, "width": 20, "artifact_points": [[[1, 2], [20.5, 3]]], "misalignment_points": [[]]}"#,
            "line 2: artifact_points[0][1] = [20.5, 3] is outside the 20x10 image",
        ),
        (
            r#"{"filename": "b.png", "height": 10, "width": 20, "artifact_points": [[]], "misalignment_points": [[], [[-1, 3]]]}"#,
            "line 2: misalignment_points[1][0] = [-1, 3] is outside",
        ),
        (
            r#"{"filename": "b.png", "height": 10, "width": 20, "artifact_points": [], "misalignment_points": [[]]}"#,
            "line 2: artifact_points has no annotators",
        ),
        (
            r#"{"filename": "b.png", "height": 0, "width": 20, "artifact_points": [[]], "misalignment_points": [[]]}"#,
            "line 2: image size 20x0 is empty",
        ),
        (
            r#"{"filename": "x/a.jpg", "height": 10, "width": 20, "artifact_points": [[]], "misalignment_points": [[]]}"#,
            "line 2: filename stem \"a\" was already used on line 1",
        ),
        (
            r#"{"filename": "b.png", "height": 10, "width": 20, "artifact_points": [[]]}"#,
            "line 2: invalid JSON",
        ),
    ];
    for (k, (bad, want)) in cases.iter().enumerate() {
        let jsonl = dir.path().join(format!("p{k}.jsonl"));
        std::fs::write(&jsonl, format!("{good}\n{bad}\n")).unwrap();
        let out = dir.path().join(format!("out{k}"));
        let e = convert_points_file(&jsonl, &out).unwrap_err().to_string();
        assert!(
            e.contains(&jsonl.display().to_string()) && e.contains(want),
            "{e}\n  wanted {want}"
        );
        assert!(!out.exists(), "a bad file wrote output");
    }
}
