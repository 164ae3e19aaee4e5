//! Helpers shared by the job tests (`mod common;`).
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::Path;

pub mod finetune;
pub mod single_file;

/// Every file under `dir`, by relative path.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().is_some_and(|n| n == "report.html" || n == ".orchestrate.lock" || n == "plan.json") {
                // The report shows each run's own timings and folder; the
                // data it shows is compared through the files themselves.
                // The lock file names the process that held it; plan.json
                // names the shard (and a merge's sources).
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Byte-identical output folders; names the files that differ.
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_same_maps(a, b, tree(a), tree(b));
}

/// [`tree`] without the shard folders (`shard-i-of-n/`) at the top of `dir`:
/// what a merge of them made there.
pub fn merged_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let is_shard = |k: &str| {
        let top = k.split('/').next().unwrap_or("");
        top.strip_prefix("shard-").is_some_and(|r| r.contains("-of-")) && k.contains('/')
    };
    tree(dir).into_iter().filter(|(k, _)| !is_shard(k)).collect()
}

/// A merged folder (`a`, shard folders beside) holds the files of an unsharded run's (`b`), byte for byte.
pub fn assert_same_merged(a: &Path, b: &Path) {
    assert_same_maps(a, b, merged_tree(a), merged_tree(b));
}

/// The `orchestrate` binary, logging at warn, with no scheduler's shard
/// environment, run in `dir` with a wall-clock limit: a run past `limit`
/// is killed and fails the test with what it printed.
pub fn run_bin_limited(args: &[&std::ffi::OsStr], limit: std::time::Duration) -> std::process::Output {
    let mut c = bin();
    c.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    wait_limited(c, limit)
}

/// Runs `cmd` (stdout and stderr piped) to its end, or kills it after `limit`
/// and fails with its output: no test here can hang.
pub fn wait_limited(mut cmd: std::process::Command, limit: std::time::Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = child.stdout.take().map(|o| reader(Box::new(o)));
    let err = child.stderr.take().map(|e| reader(Box::new(e)));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let text = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
                h.map(|h| String::from_utf8_lossy(&h.join().unwrap()).into_owned()).unwrap_or_default()
            };
            panic!("{cmd:?} ran past {limit:?} and was killed\nstdout:\n{}\nstderr:\n{}", text(out), text(err));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let bytes = |h: Option<std::thread::JoinHandle<Vec<u8>>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
    std::process::Output { status, stdout: bytes(out), stderr: bytes(err) }
}

fn assert_same_maps(a: &Path, b: &Path, ta: BTreeMap<String, Vec<u8>>, tb: BTreeMap<String, Vec<u8>>) {
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold other files",
        a.display(),
        b.display()
    );
    let differ: Vec<&String> = ta
        .iter()
        .filter(|(k, v)| tb[*k] != **v)
        .map(|(k, _)| k)
        .collect();
    assert!(
        differ.is_empty(),
        "{} and {} differ in {differ:?}",
        a.display(),
        b.display()
    );
}


/// Largest absolute difference of two tensors of one shape, in f64 on the CPU.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    if a.numel() == 0 {
        return 0.0;
    }
    let f = |t: &tch::Tensor| t.to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    (f(a) - f(b)).abs().max().double_value(&[])
}

/// Imports the tiny RAHF of the committed fixture checkpoint
/// (tests/fixtures/rahf: multi-head, tiny ViT and T5) into the folder `out`.
pub fn import_tiny_rahf(out: &Path) {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf");
    orchestrate::rahf::import::import(&f.join("multi_head.pt"), f.join("vit").to_str().unwrap(), f.join("t5").to_str().unwrap(), out)
        .unwrap();
}

/// A filter -> inpaint (of what filter keeps) recipe `dir/r.yaml` on the tiny
/// models, CPU, over three prompts, with its tiny RAHF in `dir/rahf` and
/// `extra` YAML appended (a guide section, say): what the shard, Slurm and
/// device tests run sharded and whole.
pub fn tiny_pipeline_recipe(dir: &Path, extra: &str) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rahf = dir.join("rahf");
    import_tiny_rahf(&rahf);
    std::fs::write(dir.join("prompts.txt"), "a photo of a cat\na red bicycle\na blue house\n").unwrap();
    let text = format!(
        "models:\n  generator: {gen}\n  inpaint_generator: {inp}\n  rahf: {rahf}\n  device: cpu\n\
         sampling:\n  steps: 3\n  scheduler: ddim\n  seed: 7\n  batch_size: 2\n\
         output: out\n\
         filter:\n  prompts: prompts.txt\n  samples: 2\n  threshold: 0.0\n  keep: all-above\n\
         inpaint:\n  input: filter\n  mask_threshold: 0.3\n  dilate: 2\n  candidates: 2\n{extra}",
        gen = repo.join("tests/fixtures/diffusion/sd-tiny").display(),
        inp = repo.join("tests/fixtures/diffusion/sd-tiny-inpaint").display(),
        rahf = rahf.display(),
    );
    let path = dir.join("r.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The `orchestrate` binary, logging at warn, with no scheduler's shard
/// environment (a test that wants a shard says so).
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrate"));
    c.env("RUST_LOG", "warn")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("AWS_BATCH_JOB_ARRAY_INDEX")
        .env_remove("AWS_BATCH_JOB_ARRAY_SIZE")
        .env_remove("ORCHESTRATE_SHARDS");
    c
}

/// A parity fixture run's images in diffusers' batch order: prompt-major,
/// image i of prompt p seeded `generator_seeds[p * per_prompt + i]`; a null
/// negative prompt is the empty one (none).
pub fn fixture_requests(run: &serde_json::Value) -> Vec<orchestrate::diffusion::pipeline::ImageRequest> {
    let prompts: Vec<String> = serde_json::from_value(run["prompts"].clone()).unwrap();
    let per_prompt = run["num_images_per_prompt"].as_u64().unwrap() as usize;
    let seeds: Vec<u64> = serde_json::from_value(run["generator_seeds"].clone()).unwrap();
    let negatives: Vec<String> = match &run["negative_prompt"] {
        serde_json::Value::Null => vec![String::new(); prompts.len()],
        v => serde_json::from_value(v.clone()).unwrap(),
    };
    let mut out = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        for i in 0..per_prompt {
            out.push(orchestrate::diffusion::pipeline::ImageRequest {
                prompt: prompt.clone(),
                negative_prompt: negatives[p].clone(),
                seed: seeds[p * per_prompt + i],
            });
        }
    }
    out
}

/// tests/fixtures/rahf/make_pil_tf5_fixtures.py: u8 images of five sizes (three
/// that need resizing: 56x40 → 48, 128x96, 300x211), their prompts, their PIL
/// `ViTImageProcessor` pixels (`pixels_{i}`) and both variants' PyTorch outputs
/// on those pixels, each item alone (`{variant}_{i}_scores`, `_heatmaps`).
pub struct PilReference {
    pub tensors: std::collections::HashMap<String, tch::Tensor>,
    pub meta: serde_json::Value,
    pub images: Vec<image::RgbImage>,
    pub prompts: Vec<String>,
}

pub fn rahf_reference_pil() -> PilReference {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf");
    let tensors: std::collections::HashMap<_, _> =
        orchestrate::weights::read_safetensors(&dir.join("reference_pil.safetensors")).unwrap().into_iter().collect();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_pil.json")).unwrap()).unwrap();
    let prompts: Vec<String> =
        meta["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let images = (0..prompts.len()).map(|i| rgb_from_hwc(&tensors[&format!("image_{i}")])).collect();
    PilReference { tensors, meta, images, prompts }
}

/// An RGB image from an H x W x 3 `u8` tensor (how the fixture scripts store images).
pub fn rgb_from_hwc(t: &tch::Tensor) -> image::RgbImage {
    let (h, w, _) = t.size3().unwrap();
    image::RgbImage::from_raw(w as u32, h as u32, Vec::<u8>::try_from(&t.flatten(0, -1)).unwrap()).unwrap()
}

/// `predict` of all the reference's items at once (Pillow-exact preprocessing)
/// against the PyTorch outputs: scores and heatmaps within 2e-5, the same
/// keyword sequences. `label` names the model in messages.
pub fn predict_matches_pil_reference(
    fm: &orchestrate::rahf::FeedbackModel,
    variant: &str,
    label: &str,
) -> Vec<orchestrate::rahf::Feedback> {
    let r = rahf_reference_pil();
    let all = fm.predict(&r.images, &r.prompts).unwrap();
    for (i, f) in all.iter().enumerate() {
        let what = format!("{label} item {i} ({}x{})", r.images[i].width(), r.images[i].height());
        let s = tch::Tensor::from_slice(&[f.scores.plausibility, f.scores.alignment, f.scores.aesthetics, f.scores.overall]);
        let h = tch::Tensor::stack(&[&f.implausibility_heatmap, &f.misalignment_heatmap], 0);
        for (part, got, want) in [("scores", &s, "scores"), ("heatmaps", &h, "heatmaps")] {
            let d = max_abs_diff(got, &r.tensors[&format!("{variant}_{i}_{want}")]);
            println!("{what} {part}: max abs diff {d:.3e}");
            assert!(d <= 2e-5, "{what} {part}: max abs diff {d} > 2e-5");
        }
        assert_eq!(f.sequence, r.meta["variants"][variant]["sequences"][i].as_str().unwrap(), "{what}");
    }
    all
}

/// A deterministic, structured picture (gradients and a block), so that
/// RAHF's heatmap varies over it; `variant` changes its colours.
pub fn picture(w: u32, h: u32, variant: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let block = x > w / 3 && x < 2 * w / 3 && y > h / 4 && y < h / 2;
        let r = ((x * 255) / w) as u8;
        let g = ((y * 255) / h) as u8;
        let b = if block { 255 } else { ((x * y * 7 + variant * 61) % 256) as u8 };
        image::Rgb([r ^ (variant as u8).wrapping_mul(40), g, b])
    })
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (p, q) = (e.path(), to.join(e.file_name()));
        if p.is_dir() {
            copy_dir(&p, &q);
        } else {
            std::fs::copy(&p, &q).unwrap();
        }
    }
}

/// Region guidance's latents against the unguided ones for image `b`: whether
/// every latent cell outside `mask` (sampled at each cell's top-left pixel,
/// `scale` pixels a cell) is bit-identical, and whether any cell inside moved.
pub fn region_cells(lat: &tch::Tensor, lat_u: &tch::Tensor, b: usize, mask: &image::GrayImage, scale: u32) -> (bool, bool) {
    let (mut same_outside, mut moved_inside) = (true, false);
    for y in 0..lat.size()[2] {
        for x in 0..lat.size()[3] {
            let cell = |t: &tch::Tensor| t.get(b as i64).select(1, y).select(1, x);
            let equal = cell(lat).equal(&cell(lat_u));
            if mask.get_pixel(x as u32 * scale, y as u32 * scale).0[0] > 0 {
                moved_inside |= !equal;
            } else {
                same_outside &= equal;
            }
        }
    }
    (same_outside, moved_inside)
}
