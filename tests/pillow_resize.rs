//! src/io/resize.rs against Pillow's own `Image.resize`, and
//! src/io/image_processor.rs against transformers' PIL image processors, on the
//! fixtures of tests/fixtures/pillow/make_fixtures.py. Resizing must be
//! bit-identical (equal SHA-256 of the output bytes); with
//! `ORCHESTRATE_PILLOW_DUMP=DIR` our outputs are also written to DIR as PNGs,
//! which `make_fixtures.py --compare DIR` diffs against Pillow pixel by pixel.
use orchestrate::io::image_processor::{ImageProcessor, ProcessorKind};
use orchestrate::io::resize::{resize_gray, resize_rgb, Filter};
use orchestrate::io::sha256_hex;
use orchestrate::weights::read_safetensors;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pillow")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

fn dims(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// An input PNG, cropped to `[x0, y0, w, h]` when `crop` is not null.
fn input(name: &str, crop: &Value, cache: &mut HashMap<String, image::RgbImage>) -> image::RgbImage {
    let img = cache
        .entry(name.to_string())
        .or_insert_with(|| orchestrate::io::load_rgb(&dir().join(name)).unwrap());
    if crop.is_null() {
        return img.clone();
    }
    let c = dims(crop);
    image::imageops::crop_imm(img, c[0], c[1], c[2], c[3]).to_image()
}

/// The gray inputs are the red channel of the RGB ones.
fn red(img: &image::RgbImage) -> image::GrayImage {
    image::GrayImage::from_fn(img.width(), img.height(), |x, y| image::Luma([img.get_pixel(x, y).0[0]]))
}

fn filter(name: &str) -> Filter {
    match name {
        "nearest" => Filter::Nearest,
        "box" => Filter::Box,
        "bilinear" => Filter::Bilinear,
        "hamming" => Filter::Hamming,
        "bicubic" => Filter::Bicubic,
        "lanczos" => Filter::Lanczos,
        other => panic!("unknown filter {other}"),
    }
}

/// The file name make_fixtures.py's `case_key` gives a case.
fn case_key(c: &Value) -> String {
    let stem = c["input"].as_str().unwrap().trim_end_matches(".png");
    let crop = if c["crop"].is_null() {
        String::new()
    } else {
        format!("-crop{}", dims(&c["crop"]).iter().map(u32::to_string).collect::<Vec<_>>().join("x"))
    };
    let size = dims(&c["size"]);
    format!("{stem}{crop}-{}-{}-{}x{}", c["mode"].as_str().unwrap(), c["filter"].as_str().unwrap(), size[0], size[1])
}

#[test]
fn resize_is_bit_identical_to_pillow() {
    let fixture = json("resize.json");
    let cases = fixture["cases"].as_array().unwrap();
    let dump = std::env::var_os("ORCHESTRATE_PILLOW_DUMP").map(PathBuf::from);
    let mut cache = HashMap::new();
    let mut differ = Vec::new();
    let mut per_filter: HashMap<&str, usize> = HashMap::new();
    for c in cases {
        let img = input(c["input"].as_str().unwrap(), &c["crop"], &mut cache);
        let size = dims(&c["size"]);
        let f = filter(c["filter"].as_str().unwrap());
        let (bytes, png) = match c["mode"].as_str().unwrap() {
            "RGB" => {
                let out = resize_rgb(&img, size[0], size[1], f);
                assert_eq!(out.dimensions(), (size[0], size[1]));
                (out.as_raw().clone(), dump.as_ref().map(|_| image::DynamicImage::ImageRgb8(out)))
            }
            "L" => {
                let out = resize_gray(&red(&img), size[0], size[1], f);
                assert_eq!(out.dimensions(), (size[0], size[1]));
                (out.as_raw().clone(), dump.as_ref().map(|_| image::DynamicImage::ImageLuma8(out)))
            }
            other => panic!("unknown mode {other}"),
        };
        if let (Some(d), Some(png)) = (&dump, png) {
            std::fs::create_dir_all(d).unwrap();
            png.save(d.join(format!("{}.png", case_key(c)))).unwrap();
        }
        if sha256_hex(&bytes) != c["sha256"].as_str().unwrap() {
            differ.push(case_key(c));
        }
        *per_filter.entry(c["filter"].as_str().unwrap()).or_default() += 1;
    }
    println!(
        "{} cases (Pillow {}), per filter {per_filter:?}: {} differ",
        cases.len(),
        fixture["pillow"],
        differ.len()
    );
    assert!(
        differ.is_empty(),
        "{} of {} cases differ from Pillow (rerun with ORCHESTRATE_PILLOW_DUMP=DIR, then make_fixtures.py --compare DIR): {differ:?}",
        differ.len(),
        cases.len()
    );
}

#[test]
fn image_processors_match_transformers_pil_processors() {
    let meta = json("processors.json");
    let tensors: HashMap<String, Tensor> = read_safetensors(&dir().join("processors.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let mut cache = HashMap::new();
    let mut worst = 0f64;
    let mut n = 0;
    for (name, runs) in meta["runs"].as_object().unwrap() {
        let p = ImageProcessor::load(&dir().join(format!("processors/{name}.json")), ProcessorKind::Vit).unwrap();
        for (k, run) in runs.as_array().unwrap().iter().enumerate() {
            let img = input(run["input"].as_str().unwrap(), &run["crop"], &mut cache);
            let got = p.preprocess(&img);
            let shape: Vec<i64> = dims(&run["shape"]).iter().map(|&d| d as i64).collect();
            assert_eq!(got.size(), shape, "{name} {k}");
            let (w, h) = p.output_size(img.width(), img.height());
            assert_eq!([1, 3, h as i64, w as i64], shape[..], "{name} {k}: output_size");
            if let Some(digest) = run["sha256_f32le"].as_str() {
                let v = Vec::<f32>::try_from(got.flatten(0, -1)).unwrap();
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                assert_eq!(sha256_hex(&bytes), digest, "{name} {k}: pixel_values differ from transformers'");
                println!("{name} {k}: bit-identical (digest)");
            } else {
                let want = &tensors[&format!("{name}_{k}")];
                let d = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max().double_value(&[]);
                println!("{name} {k}: max abs diff {d:.3e}");
                assert!(d <= 1e-6, "{name} {k}: max abs diff {d} > 1e-6");
                worst = worst.max(d);
            }
            n += 1;
        }
    }
    println!("{n} processor runs (transformers {}), worst max abs diff {worst:.3e}", meta["transformers"]);
}
