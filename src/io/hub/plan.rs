//! Which files of a repo orchestrate needs: decided from the repo's file list
//! (the Hub's `siblings`, or a cached snapshot's files) and, for a diffusers
//! pipeline, its `model_index.json`. The same rules choose the weights at
//! load time (`diffusion::model_dir::weight_file_candidates`), so what is
//! downloaded is what is read.
use super::HubError;
use std::collections::BTreeSet;

/// What to fetch of a repo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Want {
    /// Weights variant (`fp16` picks `*.fp16.safetensors`), as diffusers'
    /// `variant=`; a component without that variant falls back to its plain
    /// weights (said in [`Plan::notes`]).
    pub variant: Option<String>,
    /// Every file of the repo (`download --all`).
    pub all: bool,
    /// Configs, tokenizers and scheduler files only, no weights: what a
    /// single-file checkpoint's config source is read for (as diffusers'
    /// `from_single_file` fetches it).
    pub configs_only: bool,
    /// These files of the repo and nothing else (a scorer's `ORG/NAME/FILE`);
    /// each must be in the repo.
    pub files: Vec<String>,
}

/// The files to fetch, sorted, and what a user should know about the choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub files: Vec<String>,
    pub notes: Vec<String>,
}

/// The components a Stable Diffusion / SDXL pipeline (`load_pipeline_configs`),
/// FLUX (`transformer`) or SD3 (`diffusion::sd3::load_configs`: `transformer`,
/// T5 as `text_encoder_3`) reads: the safety checker, feature extractor and
/// image encoder are never loaded.
pub const PIPELINE_COMPONENTS: [&str; 10] = [
    "unet",
    "transformer",
    "vae",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
];

/// Components whose folder must hold weights.
const WEIGHTED: [&str; 6] = ["unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"];

/// File types that hold weights (in any framework's format).
const WEIGHT_EXTENSIONS: [&str; 11] =
    ["safetensors", "bin", "ckpt", "pt", "pth", "msgpack", "h5", "onnx", "onnx_data", "gguf", "pb"];

/// A weights index (`model.safetensors.index.json`, `….index.fp16.json`, the
/// legacy `….fp16.index.json`): fetched only with the shards it lists.
fn is_weight_index(name: &str) -> bool {
    name.ends_with(".json") && name.contains(".index.") && WEIGHT_EXTENSIONS.iter().any(|e| name.contains(&format!(".{e}.")))
}

fn is_weight_file(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, ext)| WEIGHT_EXTENSIONS.contains(&ext))
}

/// Configs, tokenizer and preprocessor files: JSON, text, SentencePiece models.
fn is_support_file(name: &str) -> bool {
    let ext_ok = name.ends_with(".json") || name.ends_with(".txt") || name.ends_with(".model");
    ext_ok && !is_weight_index(name)
}

/// The files to fetch. `listing` is every file of the repo at one commit;
/// `read` returns the bytes of a listed file (`model_index.json`, a weights
/// index), fetching it first when needed. `label` (`ORG/NAME@COMMIT`) names
/// the repo in errors.
pub fn plan_files(
    listing: &BTreeSet<String>,
    want: &Want,
    label: &str,
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>, HubError>,
) -> Result<Plan, HubError> {
    let fail = |message: String| HubError::Plan { repo: label.to_string(), message };
    if want.all {
        return Ok(Plan { files: listing.iter().cloned().collect(), notes: Vec::new() });
    }
    if !want.files.is_empty() {
        for f in &want.files {
            if !listing.contains(f) {
                return Err(fail(format!("the repo has no file `{f}`")));
            }
        }
        return Ok(Plan { files: want.files.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect(), notes: Vec::new() });
    }
    let mut plan = Plan::default();
    let mut files = BTreeSet::new();
    if listing.contains("model_index.json") {
        let bytes = read("model_index.json")?;
        let index: serde_json::Value = crate::json::from_str(&String::from_utf8_lossy(&bytes))
            .map_err(|e| fail(format!("model_index.json is not valid JSON: {e}")))?;
        files.insert("model_index.json".to_string());
        let listed = |name: &str| {
            index.get(name).and_then(|v| v.as_array()).is_some_and(|a| a.iter().any(|x| !x.is_null()))
        };
        let components: Vec<&str> = PIPELINE_COMPONENTS.iter().copied().filter(|c| listed(c)).collect();
        if components.is_empty() {
            return Err(fail(format!(
                "model_index.json lists none of the components orchestrate loads ({})",
                PIPELINE_COMPONENTS.join(", ")
            )));
        }
        for component in components {
            component_files(listing, component, WEIGHTED.contains(&component), want, label, read, &mut files, &mut plan.notes)?;
        }
    } else {
        // One model at the repo's root: a VAE, a text encoder, a ViT/T5
        // backbone, a RAHF folder.
        component_files(listing, "", true, want, label, read, &mut files, &mut plan.notes)?;
    }
    plan.files = files.into_iter().collect();
    Ok(plan)
}

#[allow(clippy::too_many_arguments)]
fn component_files(
    listing: &BTreeSet<String>,
    dir: &str,
    needs_weights: bool,
    want: &Want,
    label: &str,
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>, HubError>,
    files: &mut BTreeSet<String>,
    notes: &mut Vec<String>,
) -> Result<(), HubError> {
    let fail = |message: String| HubError::Plan { repo: label.to_string(), message };
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let shown = if dir.is_empty() { "the repo's root".to_string() } else { format!("{dir}/") };
    let names: BTreeSet<&str> =
        listing.iter().filter_map(|p| p.strip_prefix(prefix.as_str())).filter(|rest| !rest.contains('/')).collect();
    if names.is_empty() {
        return Err(fail(format!("model_index.json lists `{dir}`, but the repo has no files in {shown}")));
    }
    for name in names.iter().filter(|n| is_support_file(n)) {
        files.insert(format!("{prefix}{name}"));
    }
    if want.configs_only {
        return Ok(());
    }
    if !names.iter().any(|n| is_weight_file(n) || is_weight_index(n)) {
        if needs_weights {
            return Err(fail(format!(
                "no weights in {shown} (files there: {})",
                names.iter().copied().collect::<Vec<_>>().join(", ")
            )));
        }
        return Ok(());
    }
    let variant = want.variant.as_deref();
    let mut fell_back = false;
    for candidate in crate::diffusion::model_dir::weight_file_candidates(variant) {
        if !names.contains(candidate.as_str()) {
            continue;
        }
        if let Some(v) = variant {
            if !candidate.contains(&format!(".{v}.")) {
                fell_back = true;
            }
        }
        let path = format!("{prefix}{candidate}");
        if candidate.ends_with(".json") {
            let bytes = read(&path)?;
            for shard in shard_names(&bytes).map_err(|e| fail(format!("{path}: {e}")))? {
                if shard.contains('/') || shard.contains('\\') || shard == ".." {
                    return Err(fail(format!("{path}: shard `{shard}` is not a file name in {shown}")));
                }
                if !names.contains(shard.as_str()) {
                    return Err(fail(format!("{path} lists shard `{shard}`, which the repo does not have")));
                }
                files.insert(format!("{prefix}{shard}"));
            }
        }
        files.insert(path);
        if fell_back {
            notes.push(format!(
                "{shown}: no `{}` weights; its plain weights are used (as diffusers does)",
                variant.unwrap_or_default()
            ));
        }
        return Ok(());
    }
    let bins: Vec<&str> = names.iter().copied().filter(|n| n.ends_with(".bin")).collect();
    if !bins.is_empty() {
        return Err(fail(format!(
            "{shown} has only PyTorch .bin weights ({}); orchestrate reads safetensors, so nothing was downloaded (`orchestrate download --all` fetches every file anyway)",
            bins.join(", ")
        )));
    }
    let looked: Vec<String> = crate::diffusion::model_dir::weight_file_candidates(variant);
    Err(fail(format!(
        "no safetensors weights in {shown} (looked for {}; found {})",
        looked.join(", "),
        names.iter().copied().filter(|n| is_weight_file(n)).collect::<Vec<_>>().join(", ")
    )))
}

/// The shard file names of a weights index (`weight_map` values), sorted.
pub fn shard_names(bytes: &[u8]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = crate::json::from_str(&String::from_utf8_lossy(bytes)).map_err(|e| format!("not a weights index: {e}"))?;
    let set: BTreeSet<String> = index.weight_map.into_values().collect();
    Ok(set.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(files: &[&str]) -> BTreeSet<String> {
        files.iter().map(|s| s.to_string()).collect()
    }

    fn run(files: &[&str], want: &Want, index: &str) -> Result<Plan, HubError> {
        let index = index.to_string();
        plan_files(&listing(files), want, "org/x@c", &mut |p| match p {
            "model_index.json" => Ok(index.clone().into_bytes()),
            p if p.ends_with(".json") => Ok(br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#.to_vec()),
            p => panic!("read {p}"),
        })
    }

    const SD: &str = r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "text_encoder_2": [null, null]}"#;

    const SD_FILES: &[&str] = &[
        "model_index.json", "README.md", "v1-5-pruned.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_flax_model.msgpack",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
        "safety_checker/config.json", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
    ];

    #[test]
    fn pipeline_takes_used_components_safetensors_and_the_variant() {
        let plain = run(SD_FILES, &Want::default(), SD).unwrap();
        assert_eq!(
            plain.files,
            [
                "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            ]
        );
        assert!(plain.notes.is_empty());
        let fp16 = run(SD_FILES, &Want { variant: Some("fp16".into()), ..Default::default() }, SD).unwrap();
        assert!(fp16.files.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!fp16.files.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(fp16.files.contains(&"vae/diffusion_pytorch_model.fp16.safetensors".to_string()));
        // text_encoder has no fp16 file: its plain weights, said once.
        assert!(fp16.files.contains(&"text_encoder/model.safetensors".to_string()));
        assert_eq!(fp16.notes.len(), 1, "{:?}", fp16.notes);
        assert!(fp16.notes[0].contains("text_encoder/"), "{:?}", fp16.notes);
        let configs = run(SD_FILES, &Want { configs_only: true, ..Default::default() }, SD).unwrap();
        assert!(!configs.files.is_empty() && configs.files.iter().all(|f| !is_weight_file(f) && !is_weight_index(f)), "{:?}", configs.files);
        assert!(configs.files.iter().any(|f| f == "unet/config.json"), "{:?}", configs.files);
        let one = run(SD_FILES, &Want { files: vec!["unet/config.json".into()], ..Default::default() }, SD).unwrap();
        assert_eq!(one.files, ["unet/config.json"]);
        let e = run(SD_FILES, &Want { files: vec!["nope.pt".into()], ..Default::default() }, SD).unwrap_err().to_string();
        assert!(e.contains("no file `nope.pt`"), "{e}");
        let all = run(SD_FILES, &Want { all: true, ..Default::default() }, SD).unwrap();
        assert_eq!(all.files.len(), SD_FILES.len());
    }

    /// An SD3 pipeline: its `transformer` and T5 (`text_encoder_3`, `tokenizer_3`) too.
    #[test]
    fn sd3_pipeline_takes_transformer_and_t5() {
        let index = r#"{"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "image_encoder": [null, null], "feature_extractor": [null, null]}"#;
        let files = [
            "model_index.json", "sd3_medium.safetensors", "scheduler/scheduler_config.json",
            "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt",
            "text_encoder_3/config.json", "text_encoder_3/model.safetensors.index.json",
            "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
            "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json",
        ];
        let p = run(&files, &Want::default(), index).unwrap();
        for f in ["transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model-00002-of-00002.safetensors", "tokenizer_3/tokenizer.json"] {
            assert!(p.files.iter().any(|x| x == f), "{f} not in {:?}", p.files);
        }
        assert!(!p.files.iter().any(|x| x == "sd3_medium.safetensors"), "{:?}", p.files);
    }

    #[test]
    fn shards_come_from_the_index_and_must_exist() {
        let files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json", "pytorch_model.bin"];
        let p = run(&files, &Want::default(), "").unwrap();
        assert_eq!(
            p.files,
            ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
        );
        let e = run(&files[..3], &Want::default(), "").unwrap_err().to_string();
        assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("org/x@c"), "{e}");
    }

    #[test]
    fn bin_only_and_missing_components_are_refused_by_name() {
        let e = run(&["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"], &Want::default(), r#"{"unet": ["diffusers", "UNet2DConditionModel"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unet/") && e.contains(".bin") && e.contains("--all"), "{e}");
        let e = run(&["model_index.json", "unet/config.json"], &Want::default(), r#"{"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unet/"), "{e}");
        let e = run(&["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"], &Want::default(), r#"{"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`vae`"), "{e}");
    }

    #[test]
    fn sdxl_refiner_skips_null_components() {
        let index = r#"{"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": [null, null], "tokenizer": [null, null], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}"#;
        let files = [
            "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
            "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "scheduler/scheduler_config.json",
        ];
        let p = run(&files, &Want::default(), index).unwrap();
        assert_eq!(p.files.len(), files.len());
    }
}
