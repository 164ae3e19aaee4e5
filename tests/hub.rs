//! Hub downloads against a local Hub stand-in (tests/hub_server): a pipeline
//! fetched by repo id samples exactly as its folder; only what the pipeline
//! reads is fetched (safetensors, the variant, shards via their index); a
//! broken download resumes with Range (in the same run and in the next); a
//! corrupted LFS file is refused and leaves nothing in the cache; offline
//! mode and an unreachable endpoint use the cache or name what is missing;
//! the token goes to the Hub, not to the blob store; and Python's
//! huggingface_hub, pointed at the same server, writes the same cache tree.
mod common;
mod hub_server;

use hub_server::{Fault, Server};
use orchestrate::io::hub::{Hub, HubError, RepoRef, Want};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const REPO: &str = "org/sd-tiny";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion").join(name)
}

/// sd-tiny as a pipeline repo on the Hub looks: with a safety checker, a
/// feature extractor, `.bin` weights and a README, none of which orchestrate reads.
fn served_sd_tiny(dir: &Path) -> PathBuf {
    let root = dir.join("served-sd-tiny");
    common::copy_dir(&fixture("sd-tiny"), &root);
    let index_path = root.join("model_index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["safety_checker"] = serde_json::json!(["stable_diffusion", "StableDiffusionSafetyChecker"]);
    index["feature_extractor"] = serde_json::json!(["transformers", "CLIPImageProcessor"]);
    std::fs::write(&index_path, serde_json::to_string_pretty(&index).unwrap()).unwrap();
    std::fs::create_dir_all(root.join("safety_checker")).unwrap();
    std::fs::create_dir_all(root.join("feature_extractor")).unwrap();
    std::fs::write(root.join("safety_checker/config.json"), r#"{"model_type": "clip"}"#).unwrap();
    std::fs::write(root.join("safety_checker/model.safetensors"), b"never read").unwrap();
    std::fs::write(root.join("feature_extractor/preprocessor_config.json"), r#"{"size": 224}"#).unwrap();
    std::fs::write(root.join("unet/diffusion_pytorch_model.bin"), b"not read: pickled weights").unwrap();
    std::fs::write(root.join("README.md"), "# sd-tiny\n").unwrap();
    root
}

/// What orchestrate needs of sd-tiny: every file of the fixture folder.
fn needed_files() -> Vec<String> {
    let mut v: Vec<String> = common::tree(&fixture("sd-tiny")).into_keys().collect();
    v.sort();
    v
}

fn hub(server: &Server, cache: &Path) -> Hub {
    Hub {
        endpoint: server.url(),
        token: None,
        cache: cache.to_path_buf(),
        offline: false,
        retries: 2,
        timeout: Duration::from_secs(20),
        progress: false,
    }
}

fn repo() -> RepoRef {
    RepoRef::parse(REPO).unwrap()
}

fn fetch(h: &Hub) -> Result<orchestrate::io::hub::Snapshot, HubError> {
    h.resolve(&repo(), &Want::default())
}

/// Every entry under `dir` (`.incomplete` files included): a folder, a link
/// (its target) or a file (its bytes).
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    Link(PathBuf),
    File(Vec<u8>),
}

fn entries(dir: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, Entry::Link(std::fs::read_link(&p).unwrap()));
            } else if meta.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &p, out);
            } else {
                out.insert(rel, Entry::File(std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn incomplete_files(cache: &Path) -> Vec<String> {
    entries(cache).into_keys().filter(|k| k.ends_with(".incomplete")).collect()
}

/// The blob a snapshot file links to, and the link's target, checked
/// against the layout huggingface_hub writes.
fn check_pointer(cache: &Path, commit: &str, file: &str, etag: &str) {
    check_pointer_in(cache, commit, file, etag, &fixture("sd-tiny"));
}

fn check_pointer_in(cache: &Path, commit: &str, file: &str, etag: &str, served: &Path) {
    let pointer = cache.join("models--org--sd-tiny/snapshots").join(commit).join(file);
    let target = std::fs::read_link(&pointer).unwrap_or_else(|e| panic!("{}: {e}", pointer.display()));
    let ups = "../".repeat(file.split('/').count() + 1);
    assert_eq!(target, PathBuf::from(format!("{ups}blobs/{etag}")), "{file}");
    assert_eq!(std::fs::read(&pointer).unwrap(), std::fs::read(served.join(file)).unwrap(), "{file}");
}

fn orchestrate(server_url: &str, cache: &Path, home: &Path) -> std::process::Command {
    let mut c = common::bin();
    c.env("HF_ENDPOINT", server_url)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_OFFLINE");
    c
}

fn generate(mut c: std::process::Command, model: &str, out: &Path) -> Vec<Vec<u8>> {
    let o = c
        .args(["generate", "--model", model, "--prompt", "a red cube", "--seed", "3", "--steps", "2"])
        .args(["--height", "64", "--width", "64", "--scheduler", "ddim", "--device", "cpu", "--images-per-prompt", "2"])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "generate --model {model}: {}", String::from_utf8_lossy(&o.stderr));
    let images = pngs(out);
    assert_eq!(images.len(), 2);
    images
}

/// The bytes of the PNGs in `dir`, by name.
fn pngs(dir: &Path) -> Vec<Vec<u8>> {
    let mut p: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    p.sort();
    p.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn a_repo_id_is_downloaded_and_samples_as_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    let served = served_sd_tiny(tmp.path());
    let commit = server.serve(REPO, &served);
    let cache = tmp.path().join("hub");
    let home = tmp.path().join("hf-home");

    let from_repo = generate(orchestrate(&server.url(), &cache, &home), REPO, &tmp.path().join("from-repo"));
    let from_folder = generate(orchestrate(&server.url(), &cache, &home), fixture("sd-tiny").to_str().unwrap(), &tmp.path().join("from-folder"));
    assert_eq!(from_repo, from_folder, "the downloaded pipeline samples other images than its folder");

    // The layout huggingface_hub writes.
    let repo_dir = cache.join("models--org--sd-tiny");
    assert_eq!(std::fs::read(repo_dir.join("refs/main")).unwrap(), commit.as_bytes());
    let snapshot: Vec<String> = common::tree(&repo_dir.join("snapshots").join(&commit)).into_keys().collect();
    assert_eq!(snapshot, needed_files(), "only what the pipeline reads is fetched");
    for file in needed_files() {
        let bytes = std::fs::read(served.join(&file)).unwrap();
        let etag = if file.ends_with(".safetensors") { hub_server::sha256(&bytes) } else { hub_server::git_oid(&bytes) };
        check_pointer_in(&cache, &commit, &file, &etag, &served);
    }
    let tree = std::fs::read_to_string(repo_dir.join("trees").join(format!("{commit}.json"))).unwrap();
    assert!(tree.contains("safety_checker/model.safetensors") && tree.contains("README.md"), "trees/<commit>.json lists the whole repo");
    assert!(incomplete_files(&cache).is_empty());
    assert!(cache.join("CACHEDIR.TAG").is_file());

    // A second run finds everything in the cache: one revision lookup, no file request.
    server.clear_log();
    generate(orchestrate(&server.url(), &cache, &home), REPO, &tmp.path().join("again"));
    let files: Vec<String> =
        server.requests().into_iter().filter(|r| r.path.contains("/resolve/") || r.path.starts_with("/lfs/")).map(|r| r.path).collect();
    assert!(files.is_empty(), "files fetched again: {files:?}");
}

#[test]
fn download_command_fetches_what_the_pipeline_needs_or_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    let commit = server.serve(REPO, &served_sd_tiny(tmp.path()));
    let cache = tmp.path().join("hub");
    let home = tmp.path().join("hf-home");
    let run = |args: &[&str], offline: bool| {
        let mut c = orchestrate(&server.url(), &cache, &home);
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        }
        c.arg("download").args(args).output().unwrap()
    };
    let o = run(&[REPO], false);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let n = needed_files().len();
    assert!(out.contains(&format!("{REPO}@{commit}: {n} files, {n} downloaded")), "{out}");
    assert!(out.trim_end().ends_with(&format!("snapshots/{commit}")), "{out}");

    let o = run(&[REPO, "--all"], false);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The five files orchestrate does not read.
    assert!(out.contains(&format!("{} files, 5 downloaded", n + 5)), "{out}");
    assert!(cache.join("models--org--sd-tiny/snapshots").join(&commit).join("unet/diffusion_pytorch_model.bin").is_file());

    // Offline: the cache, and no request at all.
    server.clear_log();
    let o = run(&[REPO], true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("{n} files, 0 downloaded")));
    let o = run(&["org/elsewhere"], true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("org/elsewhere") && err.contains("models--org--elsewhere") && err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(server.requests().is_empty(), "offline mode made requests: {:?}", server.requests());

    let o = run(&["not a repo"], false);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ORG/NAME"));
}

#[test]
fn a_broken_download_resumes_with_range() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    server.serve(REPO, &served_sd_tiny(tmp.path()));
    let cache = tmp.path().join("hub");
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let text = "text_encoder/model.safetensors";

    // In one run: the connection drops after 1000 bytes, the client resumes from there.
    server.fault(Fault::DropAfter { file: unet.into(), after: 1000, times: 1 });
    // In the next run: with no retry left the run stops, keeping its 700 bytes...
    server.fault(Fault::DropAfter { file: text.into(), after: 700, times: 1 });
    let mut h = hub(&server, &cache);
    h.retries = 0;
    let e = fetch(&h).unwrap_err().to_string();
    assert!(e.contains(text) && e.contains("byte 700") && e.contains("resume"), "{e}");
    let incomplete = incomplete_files(&cache);
    assert_eq!(incomplete.len(), 1, "{incomplete:?}");
    assert_eq!(std::fs::metadata(cache.join(&incomplete[0])).unwrap().len(), 700);
    let unet_sha = server.sha256_of(REPO, unet);
    let text_sha = server.sha256_of(REPO, text);
    assert!(incomplete[0].ends_with(&format!("{text_sha}.incomplete")));

    // ... and the next run asks for the rest.
    h.retries = 2;
    let s = fetch(&h).unwrap();
    let ranges: Vec<(String, Option<String>)> =
        server.requests().into_iter().filter(|r| r.path.starts_with("/lfs/")).map(|r| (r.path, r.range)).collect();
    assert!(ranges.contains(&(format!("/lfs/{unet_sha}"), Some("bytes=1000-".into()))), "{ranges:?}");
    assert!(ranges.contains(&(format!("/lfs/{text_sha}"), Some("bytes=700-".into()))), "{ranges:?}");
    assert!(incomplete_files(&cache).is_empty());
    check_pointer(&cache, &s.commit, unet, &unet_sha);
    check_pointer(&cache, &s.commit, text, &text_sha);
}

#[test]
fn a_corrupted_lfs_file_is_refused_and_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    server.serve(REPO, &served_sd_tiny(tmp.path()));
    let cache = tmp.path().join("hub");
    let vae = "vae/diffusion_pytorch_model.safetensors";
    let sha = server.sha256_of(REPO, vae);
    server.fault(Fault::Corrupt { file: vae.into() });
    let e = fetch(&hub(&server, &cache)).unwrap_err();
    assert!(matches!(e, HubError::HashMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(vae) && msg.contains(&sha) && msg.contains(&format!("/lfs/{sha}")) && msg.contains("SHA-256"), "{msg}");
    let repo_dir = cache.join("models--org--sd-tiny");
    assert!(!repo_dir.join("blobs").join(&sha).exists(), "the corrupted blob was cached");
    assert!(incomplete_files(&cache).is_empty(), "a corrupted partial file was left");
    let leftover: Vec<String> = entries(&repo_dir.join("snapshots")).into_keys().filter(|k| k.ends_with(vae)).collect();
    assert!(leftover.is_empty(), "{leftover:?}");
    // The Hub fixed: the same cache completes.
    server.clear_faults();
    let s = fetch(&hub(&server, &cache)).unwrap();
    check_pointer(&cache, &s.commit, vae, &sha);
}

#[test]
fn offline_and_unreachable_use_the_cache_or_name_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    server.serve(REPO, &served_sd_tiny(tmp.path()));
    let cache = tmp.path().join("hub");
    let online = fetch(&hub(&server, &cache)).unwrap();

    server.clear_log();
    let mut offline = hub(&server, &cache);
    offline.offline = true;
    let s = fetch(&offline).unwrap();
    assert_eq!(s.dir, online.dir);
    assert!(s.fetched.is_empty());
    assert!(server.requests().is_empty(), "offline requests: {:?}", server.requests());
    // The pinned commit resolves too.
    let pinned = offline.resolve(&RepoRef::parse(&format!("{REPO}@{}", s.commit)).unwrap(), &Want::default()).unwrap();
    assert_eq!(pinned.dir, s.dir);

    // An endpoint that does not answer: the cache serves.
    let gone = {
        let dead = Server::start();
        dead.url()
    };
    let mut unreachable = hub(&server, &cache);
    unreachable.endpoint = gone.clone();
    assert_eq!(fetch(&unreachable).unwrap().dir, online.dir);

    // A file missing from the cache: named, offline or not.
    let unet = "unet/diffusion_pytorch_model.safetensors";
    std::fs::remove_file(online.dir.join(unet)).unwrap();
    let e = fetch(&offline).unwrap_err().to_string();
    assert!(e.contains(unet) && e.contains("HF_HUB_OFFLINE") && e.contains(REPO), "{e}");
    let e = fetch(&unreachable).unwrap_err().to_string();
    assert!(e.contains(unet) && e.contains(&gone), "{e}");
    // fp16 weights were never fetched: offline says which.
    let e = offline.resolve(&repo(), &Want { variant: Some("fp16".into()), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains(unet), "{e}");
    let e = offline.resolve(&RepoRef::parse("org/never").unwrap(), &Want::default()).unwrap_err().to_string();
    assert!(e.contains("models--org--never") && e.contains("HF_HUB_OFFLINE"), "{e}");
    // Online again: the file's blob is still cached, so it is linked again, not downloaded.
    server.clear_log();
    let again = fetch(&hub(&server, &cache)).unwrap();
    assert!(again.dir.join(unet).is_file() && again.fetched.is_empty());
    let heads: Vec<String> = server.requests().into_iter().filter(|r| r.method == "HEAD").map(|r| r.path).collect();
    assert_eq!(heads, [format!("/{REPO}/resolve/{}/{unet}", again.commit)]);
    assert!(!server.requests().iter().any(|r| r.cdn), "a cached blob was downloaded again");
}

#[test]
fn the_token_goes_to_the_hub_and_not_to_the_blob_store() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    server.serve(REPO, &served_sd_tiny(tmp.path()));
    server.require_token(REPO, "hf_secret");
    let cache = tmp.path().join("hub");
    let e = fetch(&hub(&server, &cache)).unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN") && e.contains("/api/models/org/sd-tiny/revision/main"), "{e}");
    let mut h = hub(&server, &cache);
    h.token = Some("hf_secret".into());
    fetch(&h).unwrap();
    let (blob_requests, hub_requests): (Vec<_>, Vec<_>) = server.requests().into_iter().partition(|r| r.cdn);
    assert!(hub_requests.iter().skip(1).all(|r| r.auth.as_deref() == Some("Bearer hf_secret")), "{hub_requests:?}");
    assert!(!blob_requests.is_empty() && blob_requests.iter().all(|r| r.auth.is_none()), "{blob_requests:?}");
}

#[test]
fn the_variant_and_sharded_weights_are_fetched_and_read() {
    use orchestrate::weights::{read_safetensors, write_safetensors};
    let tmp = tempfile::tempdir().unwrap();
    let root = served_sd_tiny(tmp.path());
    // unet: plain and fp16 weights; text_encoder: two shards and their index.
    let unet: Vec<(String, tch::Tensor)> = read_safetensors(&root.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let half: Vec<(String, tch::Tensor)> = unet.iter().map(|(n, t)| (n.clone(), t.to_kind(tch::Kind::Half))).collect();
    write_safetensors(&root.join("unet/diffusion_pytorch_model.fp16.safetensors"), &half).unwrap();
    let te = read_safetensors(&root.join("text_encoder/model.safetensors")).unwrap();
    let (a, b) = te.split_at(te.len() / 2);
    let shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    write_safetensors(&root.join("text_encoder").join(shards[0]), a).unwrap();
    write_safetensors(&root.join("text_encoder").join(shards[1]), b).unwrap();
    let weight_map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|(n, _)| (n.clone(), shards[0].into()))
        .chain(b.iter().map(|(n, _)| (n.clone(), shards[1].into())))
        .collect();
    std::fs::write(
        root.join("text_encoder/model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    std::fs::remove_file(root.join("text_encoder/model.safetensors")).unwrap();

    let server = Server::start();
    server.serve(REPO, &root);
    let cache = tmp.path().join("hub");
    let s = hub(&server, &cache).resolve(&repo(), &Want { variant: Some("fp16".into()), ..Default::default() }).unwrap();
    let has = |f: &str| s.files.iter().any(|x| x == f);
    assert!(has("unet/diffusion_pytorch_model.fp16.safetensors") && !has("unet/diffusion_pytorch_model.safetensors"), "{:?}", s.files);
    assert!(has("text_encoder/model.safetensors.index.json") && shards.iter().all(|f| has(&format!("text_encoder/{f}"))), "{:?}", s.files);
    assert!(has("vae/diffusion_pytorch_model.safetensors"), "no fp16 VAE: its plain weights");
    assert!(s.notes.iter().any(|n| n.contains("vae/")), "{:?}", s.notes);
    assert!(!s.files.iter().any(|f| f.starts_with("safety_checker") || f.ends_with(".bin")), "{:?}", s.files);

    let dir = s.dir.to_str().unwrap();
    let c = orchestrate::diffusion::model_dir::load_pipeline_configs_with(dir, None, Some("fp16")).unwrap();
    assert!(c.dir.weights("unet").unwrap()[0].ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
    assert_eq!(c.dir.weights("text_encoder").unwrap().len(), 2);
    // Without the variant, the plain UNet weights are not in this snapshot.
    let e = orchestrate::diffusion::model_dir::load_pipeline_configs_with(dir, None, None).unwrap_err().to_string();
    assert!(e.contains("unet"), "{e}");
    orchestrate::diffusion::pipeline::StableDiffusion::load_with(dir, None, Some("fp16"), tch::Device::Cpu, tch::Kind::Float).unwrap();
}

/// A Python with huggingface_hub: `ORCHESTRATE_PYTHON`, else the project's `.venv`.
fn python_with_hub() -> Option<(PathBuf, String)> {
    let candidates = [
        std::env::var_os("ORCHESTRATE_PYTHON").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")),
    ];
    for py in candidates.into_iter().flatten() {
        let o = std::process::Command::new(&py).args(["-c", "import huggingface_hub; print(huggingface_hub.__version__)"]).output();
        if let Ok(o) = o {
            if o.status.success() {
                return Some((py, String::from_utf8_lossy(&o.stdout).trim().to_string()));
            }
        }
    }
    None
}

#[test]
fn python_huggingface_hub_writes_the_same_cache_tree() {
    let Some((python, version)) = python_with_hub() else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "no Python with huggingface_hub under CI=true: scripts/setup.sh installs it into .venv");
        eprintln!("skipped: no Python with huggingface_hub (.venv/bin/python or ORCHESTRATE_PYTHON)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    server.serve(REPO, &served_sd_tiny(tmp.path()));
    let ours = tmp.path().join("rust-cache");
    let theirs = tmp.path().join("python-cache");
    let s = fetch(&hub(&server, &ours)).unwrap();

    let script = "import json, sys\nfrom huggingface_hub import snapshot_download\n\
                  print(snapshot_download(sys.argv[1], cache_dir=sys.argv[2], allow_patterns=json.loads(sys.argv[3])))";
    let o = std::process::Command::new(&python)
        .args(["-c", script, REPO])
        .arg(&theirs)
        .arg(serde_json::to_string(&s.files).unwrap())
        .env("HF_ENDPOINT", server.url())
        .env("HF_HOME", tmp.path().join("py-home"))
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(o.status.success(), "huggingface_hub {version}: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), theirs.join("models--org--sd-tiny/snapshots").join(&s.commit).to_str().unwrap());

    let (a, b) = (entries(&ours), entries(&theirs));
    let only_ours: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_theirs: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(only_ours.is_empty() && only_theirs.is_empty(), "only ours: {only_ours:?}\nonly huggingface_hub {version}'s: {only_theirs:?}");
    let differ: Vec<&String> = a.keys().filter(|k| a[*k] != b[*k]).collect();
    assert!(differ.is_empty(), "differ: {differ:?}");
    let links = a.values().filter(|e| matches!(e, Entry::Link(_))).count();
    let files = a.values().filter(|e| matches!(e, Entry::File(_))).count();
    let dirs = a.values().filter(|e| matches!(e, Entry::Dir)).count();
    eprintln!("huggingface_hub {version} and orchestrate wrote the same cache tree: {} entries ({links} links, {files} files, {dirs} folders)", a.len());

    // And each reads the other's: ours resolves Python's cache offline.
    let mut offline = hub(&server, &theirs);
    offline.offline = true;
    assert_eq!(fetch(&offline).unwrap().files, s.files);
}

/// Scorer checkpoints by repo id: a CLIP folder (`ORG/NAME`: its configs,
/// tokenizer and safetensors weights) and one file of a repo
/// (`ORG/NAME/FILE`: that file alone) score as the local files do.
#[test]
fn scorer_checkpoints_are_fetched_by_repo_id() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    let scorers = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scorers");
    let clip = tmp.path().join("served-clip");
    common::copy_dir(&scorers.join("clip-tiny"), &clip);
    std::fs::write(clip.join("README.md"), "# clip-tiny\n").unwrap();
    std::fs::write(clip.join("pytorch_model.bin"), b"not read: pickled weights").unwrap();
    let clip_commit = server.serve("org/clip-tiny", &clip);
    let mlp = tmp.path().join("served-mlp");
    std::fs::create_dir_all(&mlp).unwrap();
    std::fs::copy(scorers.join("aesthetic-tiny.pth"), mlp.join("aesthetic-tiny.pth")).unwrap();
    std::fs::write(mlp.join("other.pth"), b"not fetched").unwrap();
    let mlp_commit = server.serve("org/aesthetic", &mlp);
    let cache = tmp.path().join("hub");
    let home = tmp.path().join("hf-home");
    let img = tmp.path().join("i.png");
    common::picture(40, 32, 1).save(&img).unwrap();

    let score = |clip_spec: &str, mlp_spec: &str| -> serde_json::Value {
        let o = orchestrate(&server.url(), &cache, &home)
            .args(["score", "--scorer-model", &format!("clipscore={clip_spec}")])
            .args(["--scorer-model", &format!("aesthetic={mlp_spec},{clip_spec}")])
            .args(["--score", "0.5*clipscore+0.5*aesthetic", "--prompt", "a red dog"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().lines().next().unwrap()).unwrap()
    };
    let local = score(scorers.join("clip-tiny").to_str().unwrap(), scorers.join("aesthetic-tiny.pth").to_str().unwrap());
    let remote = score("org/clip-tiny", "org/aesthetic/aesthetic-tiny.pth");
    assert_eq!(remote["raw"], local["raw"], "the fetched checkpoints score otherwise than the local files");
    assert!(local["raw"]["clipscore"]["clipscore"].is_number() && local["raw"]["aesthetic"]["aesthetic"].is_number());

    let snapshot = |repo: &str, commit: &str| -> Vec<String> {
        common::tree(&cache.join(format!("models--org--{repo}")).join("snapshots").join(commit)).into_keys().collect()
    };
    let mut want: Vec<String> = common::tree(&scorers.join("clip-tiny")).into_keys().collect();
    want.sort();
    assert_eq!(snapshot("clip-tiny", &clip_commit), want, "only the folder's configs, tokenizer and safetensors weights");
    assert_eq!(snapshot("aesthetic", &mlp_commit), ["aesthetic-tiny.pth"], "only the named file");

    // A file the repo does not have is named.
    let o = orchestrate(&server.url(), &cache, &home)
        .args(["score", "--scorer-model", "aesthetic=org/aesthetic/nope.pth,org/clip-tiny", "--score", "aesthetic"])
        .args(["--prompt", "x"])
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nope.pth"), "{err}");
}

/// A single-file checkpoint's config source given as a repo id: only its
/// configs, tokenizer and scheduler are fetched (as `from_single_file`
/// does), and the file samples as the folder.
#[test]
fn a_single_files_config_repo_is_fetched_without_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start();
    let served = served_sd_tiny(tmp.path());
    let commit = server.serve(REPO, &served);
    let cache = tmp.path().join("hub");
    let home = tmp.path().join("hf-home");
    let file = common::single_file::write("sd-tiny", tmp.path());
    let o = orchestrate(&server.url(), &cache, &home)
        .args(["generate", "--model"])
        .arg(&file)
        .args(["--config", REPO, "--prompt", "a red cube", "--seed", "3", "--steps", "2", "--height", "64", "--width", "64"])
        .args(["--scheduler", "ddim", "--device", "cpu", "--images-per-prompt", "2", "--out"])
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let from_folder = generate(orchestrate(&server.url(), &cache, &home), fixture("sd-tiny").to_str().unwrap(), &tmp.path().join("folder"));
    assert_eq!(pngs(&tmp.path().join("out")), from_folder, "the single file samples otherwise than its folder");
    let snapshot: Vec<String> =
        common::tree(&cache.join("models--org--sd-tiny").join("snapshots").join(&commit)).into_keys().collect();
    assert!(!snapshot.is_empty());
    for f in &snapshot {
        assert!(!f.ends_with(".safetensors") && !f.ends_with(".bin"), "weights fetched for a config source: {f}");
    }
    assert!(snapshot.iter().any(|f| f == "unet/config.json") && snapshot.iter().any(|f| f == "tokenizer/vocab.json"), "{snapshot:?}");
}
