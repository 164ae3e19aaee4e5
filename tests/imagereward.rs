//! ImageReward against ImageReward's own model code (BLIP's ViT and
//! cross-attention BERT, ImageReward's MLP and `score_gard`) on a tiny random
//! model saved as the user downloads it: `ImageReward.pt` + `med_config.json`
//! (tests/fixtures/imagereward/make_fixtures.py).
mod common;
use common::max_abs_diff;
use orchestrate::scorers::imagereward::{ImageReward, LoadOptions, MedConfig};
use orchestrate::weights::read_safetensors;
use orchestrate::Error;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/imagereward")
}

fn expected() -> HashMap<String, Tensor> {
    read_safetensors(&dir().join("expected.safetensors")).unwrap().into_iter().collect()
}

/// The fixture's ViT has 4 heads at width 32 (8 per head), which the
/// checkpoint cannot say: BLIP's real ViTs have 64 per head.
fn opts() -> LoadOptions {
    LoadOptions { device: Device::Cpu, vision_heads: Some(4) }
}

fn tiny() -> ImageReward {
    let d = dir().join("tiny");
    ImageReward::load_with(&d.join("ImageReward.pt"), &d.join("med_config.json"), &opts()).unwrap()
}

/// Relative difference: max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / b.abs().max().double_value(&[])
}

#[test]
fn shapes_come_from_the_checkpoint_and_config() {
    let m = tiny();
    let v = m.vision_config();
    assert_eq!((v.width, v.depth, v.heads, v.patch_size, v.image_size, v.mlp_hidden), (32, 2, 4, 8, 32, 128));
    let t = m.med_config();
    assert_eq!((t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size), (16, 2, 2, 64));
}

#[test]
fn scores_match_reference() {
    let e = expected();
    let m = tiny();
    let s = m.score(&e["pixel_values"], &e["input_ids"], &e["attention_mask"]).unwrap();
    let want = &e["scores"];
    let d = max_abs_diff(&s, want);
    println!("scores {:?} vs {:?}: max |diff| {d:e}", Vec::<f32>::try_from(&s).unwrap(), Vec::<f32>::try_from(want).unwrap());
    assert!(d < 1e-5, "max |diff| {d}");
    // Non-degenerate: pairs 0/1 differ only in the image, 2/3 only in the prompt.
    let v: Vec<f32> = Vec::try_from(want).unwrap();
    assert!((v[0] - v[1]).abs() > 0.1 && (v[2] - v[3]).abs() > 0.1, "{v:?}");

    // The intermediate tensors, too.
    let embeds = m.image_embeds(&e["pixel_values"]).unwrap();
    assert!(max_abs_diff(&embeds, &e["image_embeds"]) < 1e-5);
    let f = m.features(&e["pixel_values"], &e["input_ids"], &e["attention_mask"]).unwrap();
    assert!(max_abs_diff(&f, &e["features"]) < 1e-5);

    // A prompt with no padding.
    let px = e["pixel_values"].narrow(0, 1, 1);
    let s = m.score(&px, &e["full_input_ids"], &e["full_attention_mask"]).unwrap();
    let d = max_abs_diff(&s, &e["full_score"]);
    assert!(d < 1e-5, "full-length prompt: max |diff| {d}");
}

#[test]
fn scores_do_not_depend_on_the_batch() {
    let e = expected();
    let m = tiny();
    let all = m.score(&e["pixel_values"], &e["input_ids"], &e["attention_mask"]).unwrap();
    for i in 0..4 {
        let one = m
            .score(&e["pixel_values"].narrow(0, i, 1), &e["input_ids"].narrow(0, i, 1), &e["attention_mask"].narrow(0, i, 1))
            .unwrap();
        assert!(max_abs_diff(&one, &all.narrow(0, i, 1)) < 1e-5);
    }
}

#[test]
fn pixel_gradient_matches_autograd() {
    let e = expected();
    let m = tiny();
    let px = e["pixel_values"].copy().set_requires_grad(true);
    let s = m.score(&px, &e["input_ids"], &e["attention_mask"]).unwrap();
    s.sum(Kind::Float).backward();
    let g = px.grad();
    let r = rel(&g, &e["grad"]);
    println!("gradient: max |diff| / max |ref| = {r:e}");
    assert!(r < 1e-4, "relative gradient difference {r}");
    assert!(e["grad"].abs().max().double_value(&[]) > 1e-3, "degenerate gradient");
}

#[test]
fn default_head_count_is_width_over_64() {
    // Width 32 is no multiple of 64: without an explicit head count the
    // loader says so, naming the file and tensor.
    let d = dir().join("tiny");
    let err = ImageReward::load(&d.join("ImageReward.pt"), &d.join("med_config.json"), Device::Cpu)
        .err()
        .expect("width 32 needs vision_heads");
    let msg = err.to_string();
    assert!(msg.contains("ImageReward.pt") && msg.contains("blip.visual_encoder.patch_embed.proj.weight"), "{msg}");
    assert!(msg.contains("vision_heads"), "{msg}");
}

fn med_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(dir().join("tiny/med_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(v.as_object_mut().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("med_config.json");
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    (tmp, p)
}

fn load_err(med: &Path) -> String {
    let ckpt = dir().join("tiny/ImageReward.pt");
    match ImageReward::load_with(&ckpt, med, &opts()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_config_values_name_file_and_field() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("hidden_size", serde_json::json!(-16), "hidden_size"),
        ("hidden_size", serde_json::json!("16"), "hidden_size"),
        ("num_attention_heads", serde_json::json!(3), "num_attention_heads"),
        ("num_hidden_layers", serde_json::json!(3), "num_hidden_layers"),
        ("num_hidden_layers", serde_json::json!(1), "num_hidden_layers"),
        ("vocab_size", serde_json::json!(100), "vocab_size"),
        ("intermediate_size", serde_json::json!(48), "intermediate_size"),
        ("max_position_embeddings", serde_json::json!(0), "max_position_embeddings"),
        ("hidden_act", serde_json::json!("tanhh"), "hidden_act"),
        ("layer_norm_eps", serde_json::json!(-1.0), "layer_norm_eps"),
        ("add_cross_attention", serde_json::json!(false), "add_cross_attention"),
        ("position_embedding_type", serde_json::json!("relative_key"), "position_embedding_type"),
    ];
    for (field, value, named) in cases {
        let (_tmp, p) = med_with(|m| {
            m.insert(field.to_string(), value.clone());
        });
        let msg = load_err(&p);
        assert!(msg.contains("med_config.json") && msg.contains(named), "{field}={value}: {msg}");
    }
    let (_tmp, p) = med_with(|m| {
        m.remove("vocab_size");
    });
    let msg = load_err(&p);
    assert!(msg.contains("med_config.json") && msg.contains("vocab_size") && msg.contains("missing"), "{msg}");

    // Not JSON at all.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("med_config.json");
    std::fs::write(&p, "{ not json").unwrap();
    assert!(matches!(MedConfig::read(&p), Err(Error::Json { .. })));
    // BLIP overwrites encoder_width with the ViT's: any value is accepted, as there.
    let (_tmp, p) = med_with(|m| {
        m.insert("encoder_width".into(), serde_json::json!(12345));
    });
    ImageReward::load_with(&dir().join("tiny/ImageReward.pt"), &p, &opts()).unwrap();
}

/// Rewrites the fixture checkpoint with `edit` applied to its state_dict
/// pickle bytes (`data.pkl`), copying every other entry.
fn rewrite_checkpoint(out: &Path, edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) {
    let src = std::fs::File::open(dir().join("tiny/ImageReward.pt")).unwrap();
    let mut zin = zip::ZipArchive::new(src).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        let bytes = edit(&name, bytes);
        zout.start_file(name, stored).unwrap();
        zout.write_all(&bytes).unwrap();
    }
    zout.finish().unwrap();
}

fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern in data.pkl");
    [&bytes[..at], to, &bytes[at + from.len()..]].concat()
}

#[test]
fn unpickler_refuses_other_globals() {
    let tmp = tempfile::tempdir().unwrap();
    let med = dir().join("tiny/med_config.json");
    // The checkpoint's own globals load (a plain copy through the rewriter).
    let same = tmp.path().join("same.pt");
    rewrite_checkpoint(&same, |_, b| b);
    ImageReward::load_with(&same, &med, &opts()).unwrap();

    // torch.save's protocol-2 pickle names globals as `c<module>\n<name>\n`.
    for (from, to, named) in [
        (&b"ccollections\nOrderedDict\n"[..], &b"cos\nsystem\n"[..], "os.system"),
        (&b"ctorch._utils\n_rebuild_tensor_v2\n"[..], &b"cbuiltins\neval\n"[..], "builtins.eval"),
        (&b"ctorch\nFloatStorage\n"[..], &b"ctorch\nload\n"[..], "torch.load"),
    ] {
        let bad = tmp.path().join("bad.pt");
        rewrite_checkpoint(&bad, |name, b| if name.ends_with("/data.pkl") { replace(&b, from, to) } else { b });
        let err = ImageReward::load_with(&bad, &med, &opts()).err().expect("refused");
        assert!(matches!(err, Error::Pickle { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("bad.pt") && msg.contains(named), "{msg}");
    }
}

#[test]
fn checkpoint_problems_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let med = dir().join("tiny/med_config.json");
    let tensors = orchestrate::rahf::torch_pickle::load_state_dict(&dir().join("tiny/ImageReward.pt")).unwrap();
    let cfg = MedConfig::read(&med).unwrap();
    let build = |edit: &dyn Fn(&mut Vec<(String, Tensor)>)| {
        let mut t: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        edit(&mut t);
        ImageReward::from_tensors(t, "ImageReward.pt", &cfg, "med_config.json", &opts()).err().expect("refused").to_string()
    };
    let missing = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight";
    let msg = build(&|t| t.retain(|(n, _)| n != missing));
    assert!(msg.contains(missing) && msg.contains("missing"), "{msg}");

    let msg = build(&|t| t.push(("mlp.layers.9.weight".into(), Tensor::zeros([1, 1], (Kind::Float, Device::Cpu)))));
    assert!(msg.contains("mlp.layers") && msg.contains("[0, 2, 4, 6, 7]"), "{msg}");

    let msg = build(&|t| {
        t.push(("blip.text_encoder.embeddings.token_type_embeddings.weight".into(), Tensor::zeros([2, 16], (Kind::Float, Device::Cpu))))
    });
    assert!(msg.contains("token_type_embeddings"), "{msg}");

    let msg = build(&|t| {
        for (n, x) in t.iter_mut() {
            if n == "blip.visual_encoder.pos_embed" {
                *x = Tensor::zeros([1, 16, 32], (Kind::Float, Device::Cpu));
            }
        }
    });
    assert!(msg.contains("blip.visual_encoder.pos_embed") && msg.contains("square"), "{msg}");

    let msg = build(&|t| t.retain(|(n, _)| !n.starts_with("blip.visual_encoder.blocks.0.")));
    assert!(msg.contains("blocks") && msg.contains("entry 0"), "{msg}");

    // Not a checkpoint at all.
    let junk = tmp.path().join("ImageReward.pt");
    std::fs::write(&junk, b"not a zip").unwrap();
    let err = ImageReward::load_with(&junk, &med, &opts()).err().unwrap();
    assert!(matches!(err, Error::Pickle { .. }), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let e = expected();
    let m = tiny();
    let (px, ids, mask) = (&e["pixel_values"], &e["input_ids"], &e["attention_mask"]);
    let wrong_size = Tensor::zeros([4, 3, 64, 64], (Kind::Float, Device::Cpu));
    assert!(m.score(&wrong_size, ids, mask).unwrap_err().to_string().contains("[B, 3, 32, 32]"));
    assert!(m.score(px, &ids.narrow(0, 0, 3), &mask.narrow(0, 0, 3)).is_err());
    assert!(m.score(px, ids, &mask.narrow(1, 0, 10)).is_err());
    let out_of_vocab = ids.copy();
    let _ = out_of_vocab.get(0).get(3).fill_(64);
    assert!(m.score(px, &out_of_vocab, mask).unwrap_err().to_string().contains("vocabulary"));
    let too_long = Tensor::ones([4, 41], (Kind::Int64, Device::Cpu));
    assert!(m.score(px, &too_long, &too_long).unwrap_err().to_string().contains("max_position_embeddings"));
}

#[test]
fn tokenizer_matches_blip_init_tokenizer() {
    use orchestrate::scorers::imagereward::{ImageRewardTokenizer, MAX_PROMPT_TOKENS};
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("tokenizer_cases.json")).unwrap()).unwrap();
    let tok = ImageRewardTokenizer::load(&dir().join("tiny/tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size() as u64, cases["vocab_size"].as_u64().unwrap());
    let list = cases["cases"].as_array().unwrap();
    let prompts: Vec<&str> = list.iter().map(|c| c["prompt"].as_str().unwrap()).collect();
    let (ids, mask) = tok.encode(&prompts).unwrap();
    assert_eq!(ids.size(), [prompts.len() as i64, MAX_PROMPT_TOKENS as i64]);
    for (i, c) in list.iter().enumerate() {
        let want_ids: Vec<i64> = serde_json::from_value(c["input_ids"].clone()).unwrap();
        let want_mask: Vec<i64> = serde_json::from_value(c["attention_mask"].clone()).unwrap();
        assert_eq!(Vec::<i64>::try_from(ids.get(i as i64)).unwrap(), want_ids, "prompt {:?}", prompts[i]);
        assert_eq!(Vec::<i64>::try_from(mask.get(i as i64)).unwrap(), want_mask, "prompt {:?}", prompts[i]);
    }
    let missing = ImageRewardTokenizer::load(&dir().join("tiny/no-such-tokenizer.json")).err().unwrap().to_string();
    assert!(missing.contains("no-such-tokenizer.json") && missing.contains("bert-base-uncased"), "{missing}");
}

/// Timing at the published size for scripts/bench/imagereward.py, which
/// writes the files and runs this; checks the scores against PyTorch's too.
#[test]
#[ignore]
fn bench_real_size() {
    let Ok(d) = std::env::var("IMAGEREWARD_BENCH_DIR") else { return };
    let d = PathBuf::from(d);
    let reps: usize = std::env::var("IMAGEREWARD_BENCH_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(2);
    let m = ImageReward::load_dir(&d, Device::Cpu).unwrap();
    assert_eq!(m.vision_config().heads, 16);
    let x: HashMap<String, Tensor> = read_safetensors(&d.join("inputs.safetensors")).unwrap().into_iter().collect();
    let want: HashMap<String, Tensor> = read_safetensors(&d.join("scores.safetensors")).unwrap().into_iter().collect();
    let _guard = tch::no_grad_guard();
    let s = m.score(&x["pixel_values"], &x["input_ids"], &x["attention_mask"]).unwrap();
    println!("max |diff| vs PyTorch at full size: {:e}", max_abs_diff(&s, &want["scores"]));
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        let _ = m.score(&x["pixel_values"], &x["input_ids"], &x["attention_mask"]).unwrap();
    }
    let b = x["pixel_values"].size()[0] as f64;
    println!("orchestrate: {:.2} images/s", b * reps as f64 / t0.elapsed().as_secs_f64());
}
