//! Errors a user sees. Each variant names the file, tensor or setting it is about.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS error on a file. The OS text is part of this message and not
    /// chained as a source, so `{:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not found ({what})")]
    Missing { path: PathBuf, what: String },
    #[error("{path}: invalid JSON: {error}")]
    Json { path: PathBuf, error: serde_json::Error },
    #[error("{path}: corrupt or unreadable safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{file}: tensor `{name}` is missing")]
    TensorMissing { file: String, name: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        file: String,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    /// A LoRA file that cannot be merged: the tensor (or module) of the
    /// file it is about, and why (the base tensor it looked for, the shapes).
    #[error("{path}: LoRA tensor `{key}`: {reason}")]
    Lora { path: PathBuf, key: String, reason: String },
    #[error("{file}: unsupported value for `{field}`: {value}")]
    Unsupported {
        file: String,
        field: String,
        value: String,
    },
    /// A bad argument or setting, described in full by its message.
    #[error("{0}")]
    Invalid(String),
    /// A setting out of range: `field` is its name as the user wrote it
    /// (`filter.threshold`, `sampling.clip_skip`), so a recipe can point at
    /// its line without matching message text.
    #[error("{field}: {message}")]
    Field { field: String, message: String },
    /// A file this program wrote (a manifest, a settings file) that no longer
    /// reads as it wrote it; `line` is 1-based when there is one.
    #[error("{}: {reason}", line_location(path, *line))]
    Corrupt { path: PathBuf, line: Option<usize>, reason: String },
    /// The run folder is in use by another process.
    #[error("{path}: {message}")]
    Locked { path: PathBuf, message: String },
    /// A device or dtype that cannot be used here.
    #[error("{0}")]
    Device(String),
    /// A computation that produced NaN or infinity where a number is needed.
    #[error("{0}")]
    Numerical(String),
    #[error("{context}: {error}")]
    Torch { context: String, error: tch::TchError },
    #[error("{path}: tokenizer error: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: image error: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("{path}: cannot read PyTorch checkpoint: {reason}")]
    Pickle { path: PathBuf, reason: String },
    /// A recipe problem at `path:line:column`; `field` is the YAML path
    /// (`filter.threshold`), empty for a syntax error. `message` starts with
    /// the field when there is one.
    #[error("{path}:{line}:{column}: {message}")]
    Recipe { path: PathBuf, line: u64, column: u64, field: String, message: String },
    /// A Hugging Face Hub download or cache lookup (names the URL or file).
    #[error(transparent)]
    Hub(#[from] crate::io::hub::HubError),
    /// A `--shard` value, or the scheduler environment `--shard auto` reads.
    #[error(transparent)]
    Shard(#[from] crate::jobs::shard::ShardError),
    /// A worker process of `run --devices` failed: what it ran, where, and its own error.
    #[error("{job} shard {shard} on {device} failed: {message}")]
    Worker { job: String, shard: String, device: String, message: String },
    /// A data set problem: the file, and the 0-based record in it when there is one.
    #[error("{}: {reason}", data_location(path, *record))]
    Data { path: PathBuf, record: Option<u64>, reason: String },
}

fn line_location(path: &std::path::Path, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    }
}

fn data_location(path: &std::path::Path, record: Option<u64>) -> String {
    match record {
        Some(r) => format!("{} record {r}", path.display()),
        None => path.display().to_string(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Field { field: field.into(), message: message.into() }
    }
    pub fn corrupt(path: impl Into<PathBuf>, line: Option<usize>, reason: impl Into<String>) -> Self {
        Error::Corrupt { path: path.into(), line, reason: reason.into() }
    }
    pub fn unsupported(file: impl Into<String>, field: &str, value: impl std::fmt::Display) -> Self {
        Error::Unsupported { file: file.into(), field: field.to_string(), value: value.to_string() }
    }
    pub fn data(path: impl Into<PathBuf>, record: Option<u64>, reason: impl Into<String>) -> Self {
        Error::Data { path: path.into(), record, reason: reason.into() }
    }
    pub fn torch(context: impl Into<String>, error: tch::TchError) -> Self {
        Error::Torch { context: context.into(), error }
    }
}

/// Reads and parses a JSON config, naming the file (and the field) on failure;
/// Python's `NaN`/`Infinity`/`-Infinity` are accepted (see `crate::json`).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing { path: path.to_path_buf(), what: "config file".into() }
        } else {
            Error::io(path, e)
        }
    })?;
    crate::json::from_str(&text).map_err(|error| Error::Json { path: path.to_path_buf(), error })
}
