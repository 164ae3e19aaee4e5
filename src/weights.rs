//! Loading checkpoint tensors by name, with the errors a user needs: which
//! file, which tensor, expected shape versus found.
//!
//! `Vb` ("variable builder") walks the weight names the way the checkpoint
//! nests them: `vb.pp("down_blocks").pp(0).pp("resnets")`, so model code reads
//! like the checkpoint's keys.
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

pub struct Weights {
    /// Shown in errors: the file(s) the tensors came from.
    source: String,
    tensors: HashMap<String, Tensor>,
    used: Mutex<BTreeSet<String>>,
    device: Device,
    kind: Kind,
    /// For tensors renamed on load (a single-file checkpoint converted to
    /// diffusers names): the name a tensor has, or would have, in the file,
    /// which is what errors show.
    origin: Option<Origin>,
}

/// Maps a tensor name the model asks for to its name in the file.
pub type Origin = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

fn safetensors_kind(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file onto the CPU, keeping its dtype.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_safetensors_where(path, |_| true)
}

/// Maps a safetensors file read-only.
fn map_safetensors(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing { path: path.to_path_buf(), what: "weights file".into() }
        } else {
            Error::io(path, e)
        }
    })?;
    // SAFETY: the mapping is read-only and dropped before we return; a file
    // truncated underneath us would be a user error we cannot guard against.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Each tensor of a parsed file with its libtorch dtype, or the error naming
/// the tensor whose dtype libtorch cannot hold.
fn tensor_kinds<'a>(
    path: &Path,
    st: &'a safetensors::SafeTensors<'a>,
) -> Result<Vec<(String, Kind, safetensors::tensor::TensorView<'a>)>> {
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let kind = safetensors_kind(view.dtype()).ok_or_else(|| Error::Safetensors {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
        })?;
        out.push((name, kind, view));
    }
    Ok(out)
}

/// Reads the tensors of a safetensors file whose names `keep` accepts onto
/// the CPU, keeping their dtypes; the others are never read.
pub fn read_safetensors_where(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for_each_safetensor(path, keep, |name, t| {
        out.push((name, t));
        Ok(())
    })?;
    Ok(out)
}

/// Hands `each` the tensors of a safetensors file whose names `keep` accepts,
/// one at a time, each read from disk into a fresh CPU tensor of its own
/// dtype. Only the header is read through the map: the data is read per
/// tensor with positioned reads, so a caller that converts or moves each
/// tensor as it comes never holds the file twice (a mapped file's touched
/// pages count as the process's memory until it is unmapped).
pub fn for_each_safetensor(
    path: &Path,
    keep: impl Fn(&str) -> bool,
    mut each: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mmap = map_safetensors(path)?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let base = mmap.as_ptr() as usize;
    for (name, kind, view) in tensor_kinds(path, &st)? {
        if !keep(&name) {
            continue;
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        // The view's place in the file, without touching its pages.
        let data = view.data();
        let offset = (data.as_ptr() as usize - base) as u64;
        let mut bytes = vec![0u8; data.len()];
        file.read_exact_at(&mut bytes, offset).map_err(|e| Error::io(path, e))?;
        let t = Tensor::f_from_data_size(&bytes, &shape, kind)
            .map_err(|e| Error::torch(format!("{}: tensor `{name}`", path.display()), e))?;
        drop(bytes);
        each(name, t)?;
    }
    Ok(())
}

/// The names, dtypes and shapes of a safetensors file's tensors, from its
/// header alone (no tensor data is read).
pub fn read_safetensors_header(path: &Path) -> Result<Vec<(String, Kind, Vec<i64>)>> {
    let mmap = map_safetensors(path)?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(tensor_kinds(path, &st)?
        .into_iter()
        .map(|(name, kind, view)| {
            let shape = view.shape().iter().map(|&d| d as i64).collect();
            (name, kind, shape)
        })
        .collect())
}

/// The `__metadata__` strings of a safetensors file's header (empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let mmap = map_safetensors(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// A stand-in of `shape` that holds one element (a broadcast zero): enough
/// for every shape check a model load makes, without the data (`--dry-run`).
/// A floating-point tensor is made in `target`, the dtype
/// [`Weights::from_tensors`] will give it: casting a stand-in would
/// allocate the whole tensor.
pub fn shape_only(kind: Kind, target: Kind, shape: &[i64]) -> Tensor {
    let kind = if is_float(kind) { target } else { kind };
    Tensor::zeros([], (kind, Device::Cpu)).expand(shape, false)
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16)
}

/// Writes tensors as safetensors (contiguous CPU copies), atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = path.with_extension("safetensors.partial");
    let owned: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&owned, &tmp)
        .map_err(|e| Error::torch(format!("writing {}", tmp.display()), e))?;
    // Synced before the rename: a checkpoint named by latest.json must be whole after a crash.
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// [`write_safetensors`] with the header's `__metadata__` (what diffusers
/// reads a LoRA's adapter config from). The header is written here, with the
/// metadata and the tensors in sorted order, so the same tensors give the
/// same bytes in every process (the safetensors crate writes its metadata
/// map in hash order).
pub fn write_safetensors_with_metadata(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<()> {
    let tmp = path.with_extension("safetensors.partial");
    let mut owned: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).contiguous())).collect();
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    let meta: BTreeMap<&String, &String> = metadata.iter().collect();
    header.insert("__metadata__".into(), serde_json::to_value(meta).expect("strings serialise"));
    let mut data = Vec::new();
    for (name, t) in &owned {
        let dtype = match t.kind() {
            Kind::Float => "F32",
            Kind::Half => "F16",
            Kind::BFloat16 => "BF16",
            k => return Err(Error::Invalid(format!("{}: cannot write tensor {name} of dtype {k:?}", path.display()))),
        };
        let start = data.len();
        let n = t.numel() * t.kind().elt_size_in_bytes();
        data.resize(start + n, 0u8);
        t.copy_data_u8(&mut data[start..], t.numel());
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": t.size(), "data_offsets": [start, start + n] }),
        );
    }
    // serde_json's map keeps keys sorted (no preserve_order), so the header is canonical.
    let mut json = serde_json::to_vec(&header).expect("serialises");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + data.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    std::fs::write(&tmp, &bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A floating-point tensor in `kind`, on `device` (no copy when it already is).
fn convert(t: Tensor, device: Device, kind: Kind) -> Tensor {
    let t = if t.is_floating_point() && t.kind() != kind { t.to_kind(kind) } else { t };
    t.to_device(device)
}

impl Weights {
    /// Loads one or more safetensors files; floating-point tensors are cast
    /// to `kind`, every tensor is moved to `device`.
    /// Each tensor is converted and moved as it is read, so host memory
    /// peaks at the converted weights plus one tensor in the file's dtype.
    pub fn load(paths: &[PathBuf], device: Device, kind: Kind) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            for_each_safetensor(path, |_| true, |name, t| {
                tensors.insert(name, convert(t, device, kind));
                Ok(())
            })?;
        }
        let source = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Ok(Self::from_tensors(source, tensors, device, kind))
    }

    /// [`Self::load`] with stand-ins of each tensor's shape, read from the
    /// files' headers ([`shape_only`]): for checks that build a model
    /// without its data.
    pub fn load_shapes(paths: &[PathBuf], device: Device, kind: Kind) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            for (name, k, shape) in read_safetensors_header(path)? {
                tensors.insert(name, shape_only(k, kind, &shape));
            }
        }
        let source = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Ok(Self::from_tensors(source, tensors, device, kind))
    }

    pub fn from_tensors(source: impl Into<String>, tensors: HashMap<String, Tensor>, device: Device, kind: Kind) -> Self {
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| (n, convert(t, device, kind)))
            .collect();
        Weights { source: source.into(), tensors, used: Mutex::new(BTreeSet::new()), device, kind, origin: None }
    }

    /// Errors name tensors as `origin` maps them (their names in the file
    /// they were converted from).
    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = Some(origin);
        self
    }

    /// A tensor's name as errors show it: its name in the file.
    pub fn display_name(&self, name: &str) -> String {
        self.origin.as_ref().and_then(|o| o(name)).unwrap_or_else(|| name.to_string())
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Every tensor by name, sorted (shallow copies: they share storage and
    /// autograd state with what the model holds, so a trainer can mark them
    /// `requires_grad` and update them in place).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The tensor `name` (its full name), if present (not marked as used).
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Replaces the tensor `name` before any model is built from these
    /// weights (a LoRA merged into it, `crate::diffusion::lora`).
    pub fn replace(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), t);
    }

    /// Tensors in the file that no model block asked for.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut v: Vec<String> = self.tensors.keys().filter(|k| !used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    pub fn root(self) -> Vb {
        Vb { weights: Arc::new(self), prefix: String::new() }
    }
}

#[derive(Clone)]
pub struct Vb {
    weights: Arc<Weights>,
    prefix: String,
}

impl Vb {
    /// A sub-path: `vb.pp("down_blocks").pp(0)` names `down_blocks.0.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Vb { weights: self.weights.clone(), prefix }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.tensors.contains_key(&self.path(name))
    }

    /// `prefix.name` as errors show it (its name in the file it came from).
    pub fn display(&self, name: &str) -> String {
        self.weights.display_name(&self.path(name))
    }

    /// The tensor `prefix.name`, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.get_any(name)?;
        if t.size() != shape {
            return Err(Error::TensorShape {
                file: self.weights.source.clone(),
                name: self.display(name),
                expected: shape.to_vec(),
                found: t.size(),
            });
        }
        Ok(t)
    }

    /// The tensor `prefix.name`, whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let full = self.path(name);
        match self.weights.tensors.get(&full) {
            Some(t) => {
                self.weights.used.lock().unwrap().insert(full);
                Ok(t.shallow_clone())
            }
            None => Err(Error::TensorMissing { file: self.weights.source.clone(), name: self.weights.display_name(&full) }),
        }
    }

    /// The shape of tensor `prefix.name`, if present (not marked as used).
    pub fn shape_of(&self, name: &str) -> Option<Vec<i64>> {
        self.weights.tensors.get(&self.path(name)).map(|t| t.size())
    }

    /// The first tensor (by name) named this prefix or under it, if any.
    pub fn first_under(&self) -> Option<String> {
        let dot = format!("{}.", self.prefix);
        self.weights
            .tensors
            .keys()
            .filter(|k| self.prefix.is_empty() || **k == self.prefix || k.starts_with(&dot))
            .min()
            .cloned()
    }

    /// For a list prefix (`encoder.layers`): each index `i` with a tensor
    /// `prefix.i.*`, with the first such tensor's name.
    pub fn indices(&self) -> BTreeMap<i64, String> {
        let dot = if self.prefix.is_empty() { String::new() } else { format!("{}.", self.prefix) };
        let mut out: BTreeMap<i64, String> = BTreeMap::new();
        for k in self.weights.tensors.keys() {
            let Some(rest) = k.strip_prefix(&dot) else { continue };
            let Some((idx, _)) = rest.split_once('.') else { continue };
            let Ok(i) = idx.parse::<i64>() else { continue };
            match out.get(&i) {
                Some(old) if old <= k => {}
                _ => {
                    out.insert(i, k.clone());
                }
            }
        }
        out
    }

    pub fn device(&self) -> Device {
        self.weights.device
    }

    pub fn kind(&self) -> Kind {
        self.weights.kind
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }
}

/// Checks a model config against its weights before the model is built, so
/// that a config value the weights contradict (a width, a layer count, an
/// optional part) fails naming the config file and field, not only a tensor.
pub struct ConfigCheck<'a> {
    pub vb: &'a Vb,
    /// The config file, shown in errors.
    pub file: &'a str,
}

impl ConfigCheck<'_> {
    fn err(&self, field: &str, value: impl std::fmt::Display, why: String) -> Error {
        Error::unsupported(self.file, field, format!("{value}, but {why}"))
    }

    /// Dimension `dim` of tensor `name` (under `vb`) must be `want`, the value
    /// of `field`. An absent tensor passes (the model load reports it).
    pub fn dim(&self, name: &str, dim: usize, want: i64, field: &str) -> Result<()> {
        match self.vb.shape_of(name) {
            Some(shape) if shape.get(dim) != Some(&want) => Err(self.err(
                field,
                want,
                format!("the weights' `{}` has shape {shape:?}", self.vb.display(name)),
            )),
            _ => Ok(()),
        }
    }

    /// Tensor `name` must have `rank` dimensions (`field` decides which layout is used).
    pub fn rank(&self, name: &str, rank: usize, field: &str, value: impl std::fmt::Display) -> Result<()> {
        match self.vb.shape_of(name) {
            Some(shape) if shape.len() != rank => Err(self.err(
                field,
                value,
                format!("the weights' `{}` has shape {shape:?}", self.vb.display(name)),
            )),
            _ => Ok(()),
        }
    }

    /// The list `list` (`encoder.layers`) must have exactly the entries
    /// `0..want`, the count `field` gives: more entries in the weights are an
    /// error as much as fewer.
    pub fn count(&self, list: &str, want: i64, field: &str) -> Result<()> {
        let l = self.vb.pp(list);
        let found = l.indices();
        if let Some((i, name)) = found.range(want.max(0)..).next() {
            let name = self.vb.weights().display_name(name);
            return Err(self.err(field, want, format!("the weights have entry {i} of `{}` (`{name}`)", l.prefix)));
        }
        if let Some(i) = (0..want).find(|i| !found.contains_key(i)) {
            return Err(self.err(
                field,
                want,
                format!("the weights have no entry {i} of `{}` (no `{}.{i}.*` tensor)", l.prefix, l.prefix),
            ));
        }
        Ok(())
    }

    /// Nothing may be stored under `prefix` when `field` says the part is absent.
    pub fn absent(&self, prefix: &str, field: &str, value: impl std::fmt::Display) -> Result<()> {
        match self.vb.pp(prefix).first_under() {
            Some(name) => {
                Err(self.err(field, value, format!("the weights have `{}`", self.vb.weights().display_name(&name))))
            }
            None => Ok(()),
        }
    }

    /// Something must be stored under `prefix` when `field` says the part is there.
    pub fn present(&self, prefix: &str, field: &str, value: impl std::fmt::Display) -> Result<()> {
        let p = self.vb.pp(prefix);
        match p.first_under() {
            Some(_) => Ok(()),
            None => Err(self.err(field, value, format!("the weights have no `{}` tensor", p.prefix))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--dry-run` builds models from stand-ins: an fp16 file checked in
    /// fp32 must not allocate its tensors.
    #[test]
    fn shape_stand_ins_hold_one_element_whatever_the_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::ones([64, 32], (Kind::Half, Device::Cpu));
        let ids = Tensor::arange(7, (Kind::Int64, Device::Cpu));
        write_safetensors(&path, &[("w".into(), t), ("ids".into(), ids)]).unwrap();
        let w = Weights::load_shapes(&[path], Device::Cpu, Kind::Float).unwrap();
        let vb = w.root();
        let t = vb.get("w", &[64, 32]).unwrap();
        assert_eq!((t.kind(), t.stride()), (Kind::Float, vec![0, 0]));
        let ids = vb.get("ids", &[7]).unwrap();
        assert_eq!((ids.kind(), ids.stride()), (Kind::Int64, vec![0]));
    }
}
