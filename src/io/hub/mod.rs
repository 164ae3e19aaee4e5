//! Hugging Face Hub downloads into the Hugging Face cache, in the layout
//! huggingface_hub writes (see [`cache`]), so Python finds what we fetched and
//! we find what Python fetched.
//!
//! `ORG/NAME[@REV]` → the revision's commit (`GET /api/models/ORG/NAME/revision/REV`),
//! its listing (`/tree`, cached as `trees/<commit>.json` as huggingface_hub
//! does), the files a model needs ([`plan`]: `model_index.json` first for a
//! pipeline), then each missing file: `HEAD .../resolve/<commit>/<file>` for
//! its etag, size and location, and a `GET` into `blobs/<etag>.incomplete`,
//! resumed with `Range` after a broken connection (in this run or the next),
//! its size checked and, for LFS files, its SHA-256 against the etag before it
//! becomes `blobs/<etag>`; a bad file is deleted, never cached.
//!
//! Environment, as huggingface_hub reads it: `HF_ENDPOINT`, `HF_TOKEN` (else
//! `HF_TOKEN_PATH`, else `$HF_HOME/token`), `HF_HUB_OFFLINE`, `HF_HUB_CACHE`
//! (else `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`,
//! `~/.cache/huggingface/hub`), `HF_HUB_DOWNLOAD_TIMEOUT`.
pub mod cache;
pub mod http;
pub mod plan;

pub use cache::RepoCache;
pub use plan::{plan_files, Plan, Want};

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What can go wrong fetching from the Hub or reading its cache; each names
/// the URL or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{url}: {message}")]
    Http { url: String, status: u16, message: String },
    #[error("{url}: cannot reach the Hub: {reason} (HF_ENDPOINT sets another endpoint; HF_HUB_OFFLINE=1 uses the cache alone)")]
    Unreachable { url: String, reason: String },
    #[error("{url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("{url}: the download of `{file}` broke off at byte {got} of {size} after {tries} tries: {reason}; run the command again to resume it from {partial}")]
    Interrupted { url: String, file: String, got: u64, size: String, tries: u32, reason: String, partial: PathBuf },
    #[error("{url}: `{file}` failed its SHA-256 check (the Hub says {expected}, the download is {found}); it was deleted and nothing was cached")]
    HashMismatch { url: String, file: String, expected: String, found: String },
    #[error("{url}: `{file}` is {found} bytes, the Hub says {expected}; it was deleted and nothing was cached")]
    SizeMismatch { url: String, file: String, expected: u64, found: u64 },
    #[error("{repo}: {message}")]
    Plan { repo: String, message: String },
    #[error("{repo}: {message}")]
    NotCached { repo: String, message: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

impl HubError {
    /// No answer from the endpoint at all (the cache may still serve).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, HubError::Unreachable { .. })
    }
}

fn io(path: &Path, error: std::io::Error) -> HubError {
    HubError::Io { path: path.to_path_buf(), error }
}

/// `ORG/NAME[@REV]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub repo: String,
    pub revision: Option<String>,
}

impl RepoRef {
    /// Parses and validates `ORG/NAME[@REV]` with huggingface_hub's rules for
    /// repo ids (letters, digits, `-_.`, no `--` or `..`, at most 96
    /// characters); a revision is a branch, tag or commit (`refs/pr/1` too).
    pub fn parse(spec: &str) -> Result<RepoRef, HubError> {
        let (repo, revision) = match spec.split_once('@') {
            Some((r, v)) => (r, Some(v)),
            None => (spec, None),
        };
        let bad = |why: &str| HubError::Invalid(format!("`{spec}`: not a Hugging Face repo id ORG/NAME[@REVISION]: {why}"));
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 {
            return Err(bad("expected exactly one `/`"));
        }
        for p in &parts {
            if p.is_empty() || p.len() > 96 {
                return Err(bad("each part must have 1 to 96 characters"));
            }
            if !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                return Err(bad("only letters, digits, `-`, `_` and `.` are allowed"));
            }
            if p.contains("--") || p.contains("..") || p.starts_with(['-', '.']) || p.ends_with(['-', '.']) {
                return Err(bad("`--` and `..` are not allowed, nor a leading or trailing `-` or `.`"));
            }
        }
        if let Some(v) = revision {
            let ok = !v.is_empty()
                && v.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
                && !v.contains(['\\', '\0', ' ']);
            if !ok {
                return Err(bad("the revision after `@` must be a branch, tag or commit"));
            }
        }
        Ok(RepoRef { repo: repo.to_string(), revision: revision.map(str::to_string) })
    }

    pub fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match &self.revision {
            Some(r) => write!(f, "{}@{r}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// Where and how to fetch.
#[derive(Debug, Clone)]
pub struct Hub {
    /// `HF_ENDPOINT` (default `https://huggingface.co`), without a trailing `/`.
    pub endpoint: String,
    pub token: Option<String>,
    /// The cache (`$HF_HUB_CACHE`, ...).
    pub cache: PathBuf,
    /// `HF_HUB_OFFLINE`: the cache alone, no request.
    pub offline: bool,
    /// Tries after a broken download that got no new byte, per file.
    pub retries: u32,
    /// Connect and per-read timeout (`HF_HUB_DOWNLOAD_TIMEOUT`, 10 s).
    pub timeout: Duration,
    /// Report progress (a bar on a terminal, log lines otherwise).
    pub progress: bool,
}

/// A resolved snapshot: its folder and what this call did.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub repo: String,
    pub commit: String,
    /// `…/snapshots/<commit>`.
    pub dir: PathBuf,
    /// The files the model needs, all present.
    pub files: Vec<String>,
    /// Those this call downloaded, with their sizes.
    pub fetched: Vec<(String, u64)>,
    pub notes: Vec<String>,
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

fn expand_home(p: String) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// huggingface_hub's truthy values (`1`, `ON`, `YES`, `TRUE`, any case).
pub fn env_true(key: &str) -> bool {
    env_nonempty(key).is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = env_nonempty("HF_HOME") {
        return expand_home(h);
    }
    if let Some(x) = env_nonempty("XDG_CACHE_HOME") {
        return expand_home(x).join("huggingface");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface")
}

/// The cache folder, as huggingface_hub resolves it.
pub fn hub_cache() -> PathBuf {
    if let Some(p) = env_nonempty("HF_HUB_CACHE").or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE")) {
        return expand_home(p);
    }
    hf_home().join("hub")
}

impl Hub {
    /// The settings huggingface_hub would use in this environment.
    pub fn from_env() -> Result<Hub, HubError> {
        let endpoint = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(HubError::Invalid(format!("HF_ENDPOINT `{endpoint}`: expected an http:// or https:// URL")));
        }
        let token = match env_nonempty("HF_TOKEN") {
            Some(t) => Some(t),
            None => {
                let path = env_nonempty("HF_TOKEN_PATH").map(expand_home).unwrap_or_else(|| hf_home().join("token"));
                std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
            }
        };
        let timeout = match env_nonempty("HF_HUB_DOWNLOAD_TIMEOUT") {
            None => Duration::from_secs(10),
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Duration::from_secs_f64(s),
                _ => return Err(HubError::Invalid(format!("HF_HUB_DOWNLOAD_TIMEOUT `{v}`: expected seconds > 0"))),
            },
        };
        Ok(Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            cache: hub_cache(),
            offline: env_true("HF_HUB_OFFLINE"),
            retries: 5,
            timeout,
            progress: true,
        })
    }

    /// The snapshot with every file `want` asks for: from the cache alone
    /// when offline, else fetched as needed; when the endpoint cannot be
    /// reached at all, a complete cached snapshot is used (with a warning),
    /// as huggingface_hub does.
    pub fn resolve(&self, r: &RepoRef, want: &Want) -> Result<Snapshot, HubError> {
        if self.offline {
            return self.cached(r, want, "HF_HUB_OFFLINE is set, so nothing is downloaded");
        }
        match self.fetch(r, want) {
            Err(e) if e.is_unreachable() => match self.cached(r, want, "the Hub could not be reached") {
                Ok(s) => {
                    tracing::warn!("{e}; using the cached snapshot {}", s.dir.display());
                    Ok(s)
                }
                Err(cached) => Err(HubError::NotCached { repo: r.to_string(), message: format!("{e}; and {cached}") }),
            },
            other => other,
        }
    }

    /// Resolves from the cache alone: `refs/<rev>` (or a commit, or the only
    /// snapshot when no revision is named and there is no `refs/main`), and
    /// checks that every file the model needs is there. `why` says why the
    /// network is not used.
    pub fn cached(&self, r: &RepoRef, want: &Want, why: &str) -> Result<Snapshot, HubError> {
        let c = RepoCache::new(&self.cache, &r.repo);
        let not_cached = |message: String| HubError::NotCached { repo: r.to_string(), message };
        if !c.dir.is_dir() {
            return Err(not_cached(format!("not in the Hugging Face cache ({} does not exist; {why})", c.dir.display())));
        }
        let rev = r.revision_or_main();
        let commit = match c.read_ref(rev)? {
            Some(commit) => commit,
            None if r.revision.is_some() => rev.to_string(),
            None => {
                let snapshots = c.dir.join("snapshots");
                let found: Vec<String> = std::fs::read_dir(&snapshots)
                    .map_err(|e| io(&snapshots, e))?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                match found.as_slice() {
                    [one] => one.clone(),
                    [] => return Err(not_cached(format!("{}: no snapshot ({why})", snapshots.display()))),
                    _ => {
                        return Err(not_cached(format!(
                            "{}: several snapshots and no refs/main; name one as {}@COMMIT",
                            snapshots.display(),
                            r.repo
                        )))
                    }
                }
            }
        };
        if !http::safe_component(&commit) {
            return Err(not_cached(format!("`{commit}` is not a commit")));
        }
        let dir = c.snapshot(&commit);
        if !dir.is_dir() {
            return Err(not_cached(format!("{}: snapshot `{commit}` is not in the cache ({why})", dir.display())));
        }
        // The commit's full listing when huggingface_hub (or we) cached it;
        // else what the snapshot holds.
        let listing: BTreeSet<String> = match c.read_tree(&commit) {
            Some(tree) => tree.into_keys().collect(),
            None => snapshot_files(&dir)?,
        };
        let label = format!("{}@{commit}", r.repo);
        let mut read = |file: &str| -> Result<Vec<u8>, HubError> {
            let p = c.pointer(&commit, file);
            std::fs::read(&p).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => not_cached(format!("{}: not in the cache ({why})", p.display())),
                _ => io(&p, e),
            })
        };
        let plan = plan_files(&listing, want, &label, &mut read)?;
        let missing: Vec<&String> = plan.files.iter().filter(|f| !c.pointer(&commit, f).is_file()).collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
            let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
            return Err(not_cached(format!(
                "{}: the cached snapshot lacks {}{more} ({why})",
                dir.display(),
                shown.join(", ")
            )));
        }
        Ok(Snapshot { repo: r.repo.clone(), commit, dir, files: plan.files, fetched: Vec::new(), notes: plan.notes })
    }

    /// Fetches what is missing of the snapshot (see the module's doc).
    pub fn fetch(&self, r: &RepoRef, want: &Want) -> Result<Snapshot, HubError> {
        let client = http::Client::new(&self.endpoint, self.token.clone(), self.timeout);
        let c = RepoCache::new(&self.cache, &r.repo);
        let rev = r.revision_or_main();
        let (commit, siblings) = client.revision(&r.repo, rev)?;
        c.write_ref(rev, &commit)?;
        let tree = match c.read_tree(&commit) {
            Some(t) => Some(t),
            None => {
                let t = client.tree(&r.repo, &commit)?;
                if let Some(t) = &t {
                    c.write_tree(&commit, t)?;
                }
                t
            }
        };
        let mut listing = BTreeSet::new();
        for f in siblings {
            if !valid_file(&f) {
                return Err(HubError::Protocol {
                    url: format!("{}/api/models/{}/revision/{rev}", self.endpoint, r.repo),
                    reason: format!("file name `{f}` is not a relative path inside the repo"),
                });
            }
            listing.insert(f);
        }
        let label = format!("{}@{commit}", r.repo);
        let mut session =
            Session { hub: self, client: &client, repo: &r.repo, cache: &c, commit: &commit, tree: tree.as_ref(), fetched: Vec::new() };
        let mut read = |file: &str| -> Result<Vec<u8>, HubError> {
            session.ensure_files(&[file.to_string()])?;
            let p = c.pointer(&commit, file);
            std::fs::read(&p).map_err(|e| io(&p, e))
        };
        let plan = plan_files(&listing, want, &label, &mut read)?;
        session.ensure_files(&plan.files)?;
        for note in &plan.notes {
            tracing::warn!("{label}: {note}");
        }
        Ok(Snapshot {
            repo: r.repo.clone(),
            dir: c.snapshot(&commit),
            commit: commit.clone(),
            files: plan.files,
            fetched: session.fetched,
            notes: plan.notes,
        })
    }
}

/// A relative path inside a repo (as huggingface_hub's `_validate_relative_filename`).
fn valid_file(f: &str) -> bool {
    !f.is_empty() && !f.starts_with('/') && !f.contains(['\\', '\0']) && f.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// Every file under a snapshot folder (links followed), by relative path.
fn snapshot_files(dir: &Path) -> Result<BTreeSet<String>, HubError> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> Result<(), HubError> {
        for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let p = e.map_err(|e| io(dir, e))?.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else if p.is_file() {
                if let Ok(rel) = p.strip_prefix(root) {
                    out.insert(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// One resolution's downloads.
struct Session<'a> {
    hub: &'a Hub,
    client: &'a http::Client,
    repo: &'a str,
    cache: &'a RepoCache,
    commit: &'a str,
    tree: Option<&'a BTreeMap<String, cache::TreeEntry>>,
    fetched: Vec<(String, u64)>,
}

impl Session<'_> {
    /// Makes every file of `files` present in the snapshot, downloading the
    /// missing ones under one progress bar.
    fn ensure_files(&mut self, files: &[String]) -> Result<(), HubError> {
        let missing: Vec<&String> = files.iter().filter(|f| !self.cache.pointer(self.commit, f).is_file()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut metas = Vec::with_capacity(missing.len());
        for f in missing {
            let meta = self.client.head(self.repo, self.commit, f)?;
            if meta.commit != self.commit {
                return Err(HubError::Protocol {
                    url: meta.url,
                    reason: format!("X-Repo-Commit is {}, but the revision resolved to {}", meta.commit, self.commit),
                });
            }
            if let Some(entry) = self.tree.and_then(|t| t.get(f.as_str())) {
                let listed = entry.lfs_sha256.as_deref().unwrap_or(&entry.blob_id);
                if listed != meta.etag {
                    return Err(HubError::Protocol {
                        url: meta.url,
                        reason: format!("the ETag is {}, but the repo's file listing says {listed}", meta.etag),
                    });
                }
            }
            metas.push(meta);
        }
        let to_fetch: Vec<&http::FileMeta> = metas.iter().filter(|m| !self.cache.blob(&m.etag).is_file()).collect();
        let total: u64 = to_fetch.iter().map(|m| m.size.unwrap_or(0)).sum();
        let bar = if self.hub.progress && !to_fetch.is_empty() {
            crate::progress::terminal_bar(
                total,
                "{elapsed_precise} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, ETA {eta} {msg}",
            )
        } else {
            None
        };
        for meta in &metas {
            let blob = self.cache.blob(&meta.etag);
            if !blob.is_file() {
                let _lock = self.cache.lock(&meta.etag)?;
                if !blob.is_file() {
                    self.cache.tag_cache_dir()?;
                    if let Some(b) = &bar {
                        b.set_message(meta.file.clone());
                    } else if self.hub.progress {
                        let size = meta.size.map(human).unwrap_or_else(|| "size unknown".into());
                        tracing::info!("{}: downloading {} ({size})", self.repo, meta.file);
                    }
                    let n = self.download_blob(meta, bar.as_ref())?;
                    self.fetched.push((meta.file.clone(), n));
                }
            }
            self.cache.link(self.commit, &meta.file, &meta.etag)?;
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok(())
    }

    /// `GET`s a blob into `blobs/<etag>.incomplete` (resuming what is there),
    /// checks it, and moves it to `blobs/<etag>`. The caller holds the lock.
    fn download_blob(&self, meta: &http::FileMeta, bar: Option<&indicatif::ProgressBar>) -> Result<u64, HubError> {
        let inc = self.cache.incomplete(&meta.etag);
        let blob = self.cache.blob(&meta.etag);
        if let Some(dir) = inc.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&inc)
            .map_err(|e| io(&inc, e))?;
        let mut have = file.metadata().map_err(|e| io(&inc, e))?.len();
        if meta.size.is_some_and(|size| have > size) {
            file.set_len(0).map_err(|e| io(&inc, e))?;
            have = 0;
        }
        // The hash covers the bytes already there, then each new chunk.
        let mut hasher = Sha256::new();
        if have > 0 {
            file.seek(std::io::SeekFrom::Start(0)).map_err(|e| io(&inc, e))?;
            let mut buf = vec![0u8; 1 << 16];
            let mut left = have;
            while left > 0 {
                let n = file.read(&mut buf[..(left.min(1 << 16) as usize)]).map_err(|e| io(&inc, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            tracing::info!("{}: resuming {} from byte {have}", self.repo, meta.file);
        }
        file.seek(std::io::SeekFrom::Start(have)).map_err(|e| io(&inc, e))?;
        if let Some(b) = bar {
            b.inc(have);
        }
        let mut failures = 0u32;
        let mut last_reason = String::new();
        loop {
            if meta.size == Some(have) && have > 0 {
                break;
            }
            if failures > self.hub.retries {
                let _ = file.sync_all();
                return Err(HubError::Interrupted {
                    url: meta.location.clone(),
                    file: meta.file.clone(),
                    got: have,
                    size: meta.size.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                    tries: failures,
                    reason: last_reason,
                    partial: inc,
                });
            }
            if failures > 0 {
                std::thread::sleep(Duration::from_millis(500 * u64::from(failures.min(8))));
            }
            let resp = match self.client.get_from(&meta.location, have) {
                Ok(r) => r,
                Err(http::GetError::Transport(reason)) => {
                    failures += 1;
                    last_reason = reason;
                    continue;
                }
                Err(http::GetError::Fatal(e)) => return Err(e),
            };
            match resp.status().as_u16() {
                206 => {
                    if http::content_range_start(&resp) != Some(have) {
                        return Err(HubError::Protocol {
                            url: meta.location.clone(),
                            reason: format!("asked for bytes from {have}, got Content-Range {:?}", resp.headers().get("content-range")),
                        });
                    }
                }
                200 => {
                    if have > 0 {
                        // The server ignored Range: start over.
                        file.set_len(0).map_err(|e| io(&inc, e))?;
                        file.seek(std::io::SeekFrom::Start(0)).map_err(|e| io(&inc, e))?;
                        if let Some(b) = bar {
                            b.set_position(b.position().saturating_sub(have));
                        }
                        have = 0;
                        hasher = Sha256::new();
                    }
                }
                416 => {
                    // Nothing left past `have`: the partial file is longer than
                    // the blob, or complete with an unknown size.
                    if meta.size.is_none() && have > 0 {
                        break;
                    }
                    file.set_len(0).map_err(|e| io(&inc, e))?;
                    file.seek(std::io::SeekFrom::Start(0)).map_err(|e| io(&inc, e))?;
                    have = 0;
                    hasher = Sha256::new();
                    failures += 1;
                    last_reason = "HTTP 416 Range Not Satisfiable".into();
                    continue;
                }
                s => {
                    return Err(HubError::Protocol { url: meta.location.clone(), reason: format!("unexpected HTTP {s} for a download") })
                }
            }
            let before = have;
            let (n, broke) = http::stream_body(resp, &mut |chunk: &[u8]| {
                file.write_all(chunk)?;
                hasher.update(chunk);
                if let Some(b) = bar {
                    b.inc(chunk.len() as u64);
                }
                Ok(())
            });
            have += n;
            if let Some(size) = meta.size {
                if have > size {
                    drop(file);
                    let _ = std::fs::remove_file(&inc);
                    return Err(HubError::SizeMismatch { url: meta.location.clone(), file: meta.file.clone(), expected: size, found: have });
                }
            }
            match broke {
                None if meta.size.is_none_or(|s| s == have) => break,
                None => {
                    last_reason = format!("the connection closed at byte {have}");
                }
                Some(reason) if reason.starts_with("writing:") => return Err(io(&inc, std::io::Error::other(reason))),
                Some(reason) => last_reason = reason,
            }
            failures = if have > before { 1 } else { failures + 1 };
            tracing::warn!("{}: {} broke off at byte {have} ({last_reason}); resuming", self.repo, meta.file);
        }
        file.sync_all().map_err(|e| io(&inc, e))?;
        drop(file);
        if let Some(size) = meta.size {
            if have != size {
                let _ = std::fs::remove_file(&inc);
                return Err(HubError::SizeMismatch { url: meta.location.clone(), file: meta.file.clone(), expected: size, found: have });
            }
        }
        if let Some(expected) = meta.sha256() {
            let found: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            if !found.eq_ignore_ascii_case(expected) {
                let _ = std::fs::remove_file(&inc);
                return Err(HubError::HashMismatch {
                    url: meta.location.clone(),
                    file: meta.file.clone(),
                    expected: expected.to_string(),
                    found,
                });
            }
        }
        std::fs::rename(&inc, &blob).map_err(|e| io(&blob, e))?;
        if let Some(dir) = blob.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(have)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_validated() {
        assert_eq!(RepoRef::parse("org/name@refs/pr/1").unwrap().revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(RepoRef::parse("a-b/c.d_e").unwrap().revision, None);
        for bad in ["org", "a/b/c", "../x", "a/..", "a--b/c", "a/b@", "a/b@../x", "a /b", "/b"] {
            assert!(RepoRef::parse(bad).is_err(), "{bad}");
        }
    }
}
