//! Builds the single-file fixtures: `tests/fixtures/single_file/<name>.json`
//! says how each tensor of a file that diffusers' `from_single_file` was
//! checked to read back into the folder's weights is made from the folder
//! (copied, q/k/v concatenated, transposed, reshaped, zeros), and the
//! SHA-256 of that file's tensors. The file is rebuilt here from the folder
//! and the digest checked, so the tests run on exactly the file diffusers
//! read (see make_fixtures.py there).
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn recipe(name: &str) -> serde_json::Value {
    let path = root().join("tests/fixtures/single_file").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The diffusers folder a fixture was made from.
pub fn folder(name: &str) -> PathBuf {
    root().join(recipe(name)["folder"].as_str().unwrap())
}

/// The type the fixture is (`v1`, `xl_base`, ...).
pub fn model_type(name: &str) -> String {
    recipe(name)["type"].as_str().unwrap().to_string()
}

/// The fixture's tensors, in file order of the recipe.
pub fn tensors(name: &str) -> Vec<(String, Tensor)> {
    let r = recipe(name);
    let folder = root().join(r["folder"].as_str().unwrap());
    let mut sources: HashMap<String, Tensor> = HashMap::new();
    for (component, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("text_encoder_2", "model.safetensors"),
    ] {
        let path = folder.join(component).join(file);
        if path.is_file() {
            for (k, t) in orchestrate::weights::read_safetensors(&path).unwrap() {
                sources.insert(format!("{component}/{k}"), t);
            }
        }
    }
    let src = |v: &serde_json::Value| sources[v.as_str().unwrap()].shallow_clone();
    r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let key = entry[0].as_str().unwrap().to_string();
            let spec = &entry[1];
            let shape: Vec<i64> = spec["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
            let t = if let Some(s) = spec.get("from") {
                src(s)
            } else if let Some(s) = spec.get("transpose") {
                src(s).transpose(0, 1)
            } else if let Some(parts) = spec.get("cat") {
                Tensor::cat(&parts.as_array().unwrap().iter().map(src).collect::<Vec<_>>(), 0)
            } else if spec.get("zeros").is_some() {
                assert_eq!(spec["zeros"], "float32");
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu))
            } else if let Some(n) = spec.get("arange") {
                Tensor::arange(n.as_i64().unwrap(), (Kind::Int64, Device::Cpu))
            } else {
                panic!("{name}: unknown recipe entry {spec}")
            };
            (key, t.reshape(shape.as_slice()).contiguous())
        })
        .collect()
}

/// SHA-256 over a safetensors file's tensors in name order (name, dtype,
/// shape, raw bytes), as make_fixtures.py computes it.
pub fn tensor_digest(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        let view = st.tensor(name).unwrap();
        let shape = view.shape().iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        h.update(format!("{name}\0{:?}\0{shape}\0", view.dtype()).as_bytes());
        h.update(view.data());
    }
    format!("{:x}", h.finalize())
}

/// Writes fixture `name` as `dir/<name>.safetensors` and checks it is the
/// file make_fixtures.py verified with diffusers.
pub fn write(name: &str, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    orchestrate::weights::write_safetensors(&path, &tensors(name)).unwrap();
    let want = recipe(name)["tensor_digest"].as_str().unwrap().to_string();
    assert_eq!(tensor_digest(&path), want, "{name}: the rebuilt file is not the one diffusers read");
    path
}

/// Fixture `name` changed by `edit`, as `dir/<file>` (for the bad-file tests).
pub fn write_edited(name: &str, dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut t = tensors(name);
    edit(&mut t);
    let path = dir.join(file);
    orchestrate::weights::write_safetensors(&path, &t).unwrap();
    path
}
