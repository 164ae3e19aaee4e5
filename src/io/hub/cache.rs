//! The Hugging Face cache layout, exactly as huggingface_hub writes it:
//!
//! ```text
//! $HF_HUB_CACHE/
//!   CACHEDIR.TAG
//!   .locks/models--ORG--NAME/<etag>.lock        flock'd while a blob is written (Python takes the same lock)
//!   models--ORG--NAME/
//!     blobs/<etag>                              git blob id, or the SHA-256 of an LFS file
//!     blobs/<etag>.incomplete                   a partial download, resumed with HTTP Range
//!     refs/<revision>                           the commit a branch or tag pointed at (no newline)
//!     snapshots/<commit>/<path>                 relative symlinks to ../../blobs/<etag>
//!     trees/<commit>.json                       the commit's full file listing (huggingface_hub >= 2)
//! ```
use super::HubError;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// What huggingface_hub writes into `CACHEDIR.TAG` (the Cache Directory
/// Tagging Standard: backup tools skip the folder), byte for byte.
pub const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by huggingface_hub.\n\
# For information about cache directory tags, see:\n\
#\thttps://bford.info/cachedir/\n";

fn io(path: &Path, error: std::io::Error) -> HubError {
    HubError::Io { path: path.to_path_buf(), error }
}

/// One file of a commit's listing, as the Hub's `/tree` endpoint gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub size: u64,
    /// The git blob id.
    pub blob_id: String,
    pub lfs_sha256: Option<String>,
    pub lfs_size: Option<u64>,
    pub xet_hash: Option<String>,
}

/// A repo's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    /// The cache (`$HF_HUB_CACHE`).
    pub root: PathBuf,
    /// `models--ORG--NAME`.
    pub folder: String,
    /// `root/folder`.
    pub dir: PathBuf,
}

impl RepoCache {
    pub fn new(root: &Path, repo: &str) -> Self {
        let folder = format!("models--{}", repo.replace('/', "--"));
        RepoCache { root: root.to_path_buf(), dir: root.join(&folder), folder }
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    pub fn pointer(&self, commit: &str, file: &str) -> PathBuf {
        let mut p = self.snapshot(commit);
        p.extend(file.split('/'));
        p
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// Where a blob is downloaded before it is complete and verified.
    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    fn ref_path(&self, revision: &str) -> PathBuf {
        let mut p = self.dir.join("refs");
        p.extend(revision.split('/'));
        p
    }

    /// The commit `refs/<revision>` names, if the cache has it.
    pub fn read_ref(&self, revision: &str) -> Result<Option<String>, HubError> {
        let path = self.ref_path(revision);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::NotADirectory => Ok(None),
            Err(e) if path.is_dir() => Err(io(&path, e)),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Points `refs/<revision>` at `commit` (no newline, as huggingface_hub
    /// writes it), atomically; untouched when it already does.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit || self.read_ref(revision)?.as_deref() == Some(commit) {
            return Ok(());
        }
        let path = self.ref_path(revision);
        create_parent(&path)?;
        write_atomic(&path, commit.as_bytes())
    }

    /// `CACHEDIR.TAG` at the cache's root, once.
    pub fn tag_cache_dir(&self) -> Result<(), HubError> {
        let tag = self.root.join("CACHEDIR.TAG");
        if !tag.exists() {
            std::fs::create_dir_all(&self.root).map_err(|e| io(&self.root, e))?;
            write_atomic(&tag, CACHEDIR_TAG.as_bytes())?;
        }
        Ok(())
    }

    /// Holds the blob's lock (`.locks/models--ORG--NAME/<etag>.lock`, the
    /// file huggingface_hub locks) until the returned file is dropped, so a
    /// Python download and ours never write the same blob at once.
    pub fn lock(&self, etag: &str) -> Result<File, HubError> {
        let path = self.root.join(".locks").join(&self.folder).join(format!("{etag}.lock"));
        create_parent(&path)?;
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| io(&path, e))?;
        f.lock().map_err(|e| io(&path, e))?;
        Ok(f)
    }

    /// `snapshots/<commit>/<file>` → `../../blobs/<etag>` (one more `../`
    /// per folder in `file`), replacing what was there atomically.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<(), HubError> {
        let pointer = self.pointer(commit, file);
        create_parent(&pointer)?;
        let depth = file.split('/').count();
        let target: PathBuf = std::iter::repeat_n("..", depth + 1).chain(["blobs", etag]).collect();
        if std::fs::read_link(&pointer).is_ok_and(|t| t == target) {
            return Ok(());
        }
        let tmp = pointer.with_file_name(format!(
            ".{}.{}.tmp",
            pointer.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &pointer).map_err(|e| io(&pointer, e))
    }

    fn tree_path(&self, commit: &str) -> PathBuf {
        self.dir.join("trees").join(format!("{commit}.json"))
    }

    /// The commit's file listing cached by huggingface_hub (or by us), if
    /// any and readable.
    pub fn read_tree(&self, commit: &str) -> Option<BTreeMap<String, TreeEntry>> {
        let text = std::fs::read_to_string(self.tree_path(commit)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        if v.get("format_version")?.as_u64()? != 1 {
            return None;
        }
        let mut out = BTreeMap::new();
        for (path, e) in v.get("files")?.as_object()? {
            out.insert(
                path.clone(),
                TreeEntry {
                    size: e.get("size")?.as_u64()?,
                    blob_id: e.get("blob_id")?.as_str()?.to_string(),
                    lfs_sha256: e.get("lfs_sha256").and_then(|x| x.as_str()).map(str::to_string),
                    lfs_size: e.get("lfs_size").and_then(|x| x.as_u64()),
                    xet_hash: e.get("xet_hash").and_then(|x| x.as_str()).map(str::to_string),
                },
            );
        }
        Some(out)
    }

    /// Writes `trees/<commit>.json` as huggingface_hub's `write_tree_cache`
    /// does (`json.dump(..., indent=1)`, paths sorted), atomically.
    pub fn write_tree(&self, commit: &str, entries: &BTreeMap<String, TreeEntry>) -> Result<(), HubError> {
        let path = self.tree_path(commit);
        create_parent(&path)?;
        write_atomic(&path, python_tree_json(entries).as_bytes())
    }
}

fn create_parent(path: &Path) -> Result<(), HubError> {
    match path.parent() {
        Some(p) => std::fs::create_dir_all(p).map_err(|e| io(p, e)),
        None => Ok(()),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    crate::io::write_atomic(path, bytes).map_err(|e| match e {
        crate::Error::Io { path, error } => HubError::Io { path, error },
        other => HubError::Io { path: path.to_path_buf(), error: std::io::Error::other(other.to_string()) },
    })
}

/// A JSON string as Python's `json.dumps` writes it (`ensure_ascii=True`).
fn python_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `json.dump({"format_version": 1, "files": {...}}, f, indent=1)`.
fn python_tree_json(entries: &BTreeMap<String, TreeEntry>) -> String {
    let mut s = String::from("{\n \"format_version\": 1,\n \"files\": ");
    if entries.is_empty() {
        s.push_str("{}");
    } else {
        s.push_str("{\n");
        let mut first = true;
        for (path, e) in entries {
            if !first {
                s.push_str(",\n");
            }
            first = false;
            let mut fields = vec![format!("\"size\": {}", e.size), format!("\"blob_id\": {}", python_str(&e.blob_id))];
            if let Some(sha) = &e.lfs_sha256 {
                fields.push(format!("\"lfs_sha256\": {}", python_str(sha)));
                fields.push(match e.lfs_size {
                    Some(n) => format!("\"lfs_size\": {n}"),
                    None => "\"lfs_size\": null".to_string(),
                });
            }
            if let Some(x) = &e.xet_hash {
                fields.push(format!("\"xet_hash\": {}", python_str(x)));
            }
            s.push_str(&format!("  {}: {{\n   {}\n  }}", python_str(path), fields.join(",\n   ")));
        }
        s.push_str("\n }");
    }
    s.push_str("\n}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_json_is_what_python_writes() {
        let mut m = BTreeMap::new();
        m.insert("unet/config.json".to_string(), TreeEntry { size: 3, blob_id: "ab".into(), lfs_sha256: None, lfs_size: None, xet_hash: None });
        m.insert(
            "a é.safetensors".to_string(),
            TreeEntry { size: 9, blob_id: "cd".into(), lfs_sha256: Some("ef".into()), lfs_size: Some(9), xet_hash: None },
        );
        // json.dump({"format_version": 1, "files": {...}}, f, indent=1) in CPython.
        let want = "{\n \"format_version\": 1,\n \"files\": {\n  \"a \\u00e9.safetensors\": {\n   \"size\": 9,\n   \"blob_id\": \"cd\",\n   \"lfs_sha256\": \"ef\",\n   \"lfs_size\": 9\n  },\n  \"unet/config.json\": {\n   \"size\": 3,\n   \"blob_id\": \"ab\"\n  }\n }\n}";
        assert_eq!(python_tree_json(&m), want);
        assert_eq!(python_tree_json(&BTreeMap::new()), "{\n \"format_version\": 1,\n \"files\": {}\n}");
    }

    #[test]
    fn links_are_relative_to_the_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let c = RepoCache::new(tmp.path(), "org/name");
        c.link("abc", "unet/config.json", "e1").unwrap();
        c.link("abc", "model_index.json", "e2").unwrap();
        assert_eq!(std::fs::read_link(c.pointer("abc", "unet/config.json")).unwrap(), Path::new("../../../blobs/e1"));
        assert_eq!(std::fs::read_link(c.pointer("abc", "model_index.json")).unwrap(), Path::new("../../blobs/e2"));
        c.write_ref("main", "abc").unwrap();
        assert_eq!(std::fs::read(c.dir.join("refs/main")).unwrap(), b"abc");
        assert_eq!(c.read_ref("main").unwrap().as_deref(), Some("abc"));
        assert_eq!(c.read_ref("dev").unwrap(), None);
    }
}
