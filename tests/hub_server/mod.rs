//! A Hugging Face Hub stand-in for tests: serves folders as model repos on
//! 127.0.0.1 with the endpoints huggingface_hub and orchestrate call:
//!
//! - `GET /api/models/ORG/NAME/revision/REV` → `{"id", "sha", "siblings": [{"rfilename"}]}`
//! - `GET /api/models/ORG/NAME/tree/REV?recursive=true` → files (`oid` = git blob id,
//!   `size`, `lfs: {oid: sha256, size}`) and folders
//! - `HEAD`/`GET /ORG/NAME/resolve/REV/FILE`: `X-Repo-Commit`, `ETag` (git blob
//!   id); an LFS file (weights) answers `302` to `/lfs/<sha256>` on a second
//!   port, another origin like the Hub's storage CDN, with `X-Linked-Etag`
//!   (its SHA-256) and `X-Linked-Size`
//! - `GET /lfs/<sha256>` (the CDN port) with `Range: bytes=N-` → `206` and `Content-Range`
//!
//! Faults: drop the connection after N body bytes, serve a corrupted file;
//! repos that need a token. Every request is logged. One thread per
//! connection, `Connection: close`; the server stops when dropped.
#![allow(dead_code)]
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Request {
    /// Whether it came to the CDN port.
    pub cdn: bool,
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Fault {
    /// The next `times` GETs of `file`'s bytes send `after` body bytes, then close.
    DropAfter { file: String, after: usize, times: u32 },
    /// `file` is served with one byte changed (its size and advertised SHA-256 unchanged).
    Corrupt { file: String },
}

struct File {
    bytes: Vec<u8>,
    sha256: String,
    oid: String,
    lfs: bool,
}

struct Repo {
    commit: String,
    files: BTreeMap<String, File>,
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: Mutex<BTreeMap<String, Repo>>,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<Request>>,
}

pub struct Server {
    port: u16,
    cdn_port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Git's blob id: SHA-1 of `blob <len>\0<bytes>`.
pub fn git_oid(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Files the Hub's default `.gitattributes` stores in LFS.
fn is_lfs(path: &str) -> bool {
    [".safetensors", ".bin", ".ckpt", ".msgpack", ".h5", ".onnx", ".pt"].iter().any(|e| path.ends_with(e))
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, File>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).unwrap();
            out.insert(rel.clone(), File { sha256: sha256(&bytes), oid: git_oid(&bytes), lfs: is_lfs(&rel), bytes });
        }
    }
}

impl Server {
    pub fn start() -> Server {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = hub.local_addr().unwrap().port();
        let cdn_port = cdn.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (listener, is_cdn) in [(hub, false), (cdn, true)] {
            let (st, sp) = (state.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if sp.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let st = st.clone();
                        std::thread::spawn(move || handle(conn, &st, cdn_port, is_cdn));
                    }
                }
            }));
        }
        Server { port, cdn_port, state, stop, threads }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves `folder` as the repo `id` (branch `main`); returns its commit.
    pub fn serve(&self, id: &str, folder: &Path) -> String {
        let mut files = BTreeMap::new();
        walk(folder, folder, &mut files);
        let mut h = sha1::Sha1::new();
        h.update(id.as_bytes());
        for (p, f) in &files {
            h.update(format!("{p} {}\n", f.oid).as_bytes());
        }
        let commit = hex(&h.finalize());
        self.state.repos.lock().unwrap().insert(id.to_string(), Repo { commit: commit.clone(), files, token: None });
        commit
    }

    /// The repo answers only requests with `Authorization: Bearer <token>`.
    pub fn require_token(&self, id: &str, token: &str) {
        self.state.repos.lock().unwrap().get_mut(id).unwrap().token = Some(token.to_string());
    }

    pub fn fault(&self, f: Fault) {
        self.state.faults.lock().unwrap().push(f);
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }

    /// The SHA-256 of a served file.
    pub fn sha256_of(&self, id: &str, file: &str) -> String {
        self.state.repos.lock().unwrap()[id].files[file].sha256.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = TcpStream::connect(("127.0.0.1", self.cdn_port));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close (a dropped connection).
    cut: Option<usize>,
}

impl Answer {
    fn new(status: u16) -> Answer {
        Answer { status, headers: Vec::new(), body: Vec::new(), cut: None }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Answer {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn json(v: serde_json::Value) -> Answer {
        let mut a = Answer::new(200).header("Content-Type", "application/json");
        a.body = v.to_string().into_bytes();
        a
    }
    fn error(status: u16, code: &str) -> Answer {
        let mut a = Answer::new(status).header("X-Error-Code", code).header("X-Error-Message", format!("{code} (test server)"));
        a.body = format!("{{\"error\": \"{code}\"}}").into_bytes();
        a
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    }
}

fn handle(mut conn: TcpStream, state: &State, cdn_port: u16, cdn: bool) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    state.log.lock().unwrap().push(Request {
        cdn,
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    });
    let answer = if cdn && !path.starts_with("/lfs/") {
        Answer::error(404, "NotFound")
    } else {
        route(state, cdn_port, &method, &path, &headers)
    };
    let mut out = format!("HTTP/1.1 {} {}\r\n", answer.status, reason(answer.status));
    let mut has_length = false;
    for (k, v) in &answer.headers {
        has_length |= k.eq_ignore_ascii_case("content-length");
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_length {
        out.push_str(&format!("Content-Length: {}\r\n", answer.body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let _ = conn.write_all(out.as_bytes());
    if method != "HEAD" {
        let n = answer.cut.unwrap_or(answer.body.len()).min(answer.body.len());
        let _ = conn.write_all(&answer.body[..n]);
    }
    let _ = conn.flush();
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(state: &State, cdn_port: u16, method: &str, path: &str, headers: &BTreeMap<String, String>) -> Answer {
    let repos = state.repos.lock().unwrap();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Blob storage: /lfs/<sha256>
    if segs.len() == 2 && segs[0] == "lfs" {
        for repo in repos.values() {
            if let Some((name, f)) = repo.files.iter().find(|(_, f)| f.sha256 == segs[1]) {
                return content(state, name, f, headers, vec![]);
            }
        }
        return Answer::error(404, "EntryNotFound");
    }
    let (api, rest) = if segs.first() == Some(&"api") && segs.get(1) == Some(&"models") { (true, &segs[2..]) } else { (false, &segs[..]) };
    if rest.len() < 4 {
        return Answer::error(404, "NotFound");
    }
    let id = format!("{}/{}", rest[0], rest[1]);
    let Some(repo) = repos.get(&id) else {
        return Answer::error(401, "RepoNotFound");
    };
    if let Some(token) = &repo.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return Answer::error(401, "RepoNotFound");
        }
    }
    let rev = percent_decode(rest[3]);
    if rev != "main" && rev != repo.commit {
        return Answer::error(404, "RevisionNotFound").header("X-Repo-Commit", "");
    }
    match (api, rest[2]) {
        (true, "revision") => Answer::json(serde_json::json!({
            "id": id,
            "modelId": id,
            "sha": repo.commit,
            "private": repo.token.is_some(),
            "siblings": repo.files.keys().map(|k| serde_json::json!({"rfilename": k})).collect::<Vec<_>>(),
        })),
        (true, "tree") => {
            let mut entries = Vec::new();
            let mut dirs = std::collections::BTreeSet::new();
            for (p, f) in &repo.files {
                let mut acc = String::new();
                for part in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                    acc = if acc.is_empty() { part.to_string() } else { format!("{acc}/{part}") };
                    dirs.insert(acc.clone());
                }
                let mut e = serde_json::json!({"type": "file", "oid": f.oid, "size": f.bytes.len(), "path": p});
                if f.lfs {
                    e["lfs"] = serde_json::json!({"oid": f.sha256, "size": f.bytes.len(), "pointerSize": 134});
                }
                entries.push(e);
            }
            for d in dirs {
                entries.push(serde_json::json!({"type": "directory", "oid": git_oid(d.as_bytes()), "size": 0, "path": d}));
            }
            Answer::json(serde_json::Value::Array(entries))
        }
        (false, "resolve") => {
            let file = percent_decode(&rest[4..].join("/"));
            let Some(f) = repo.files.get(&file) else {
                return Answer::error(404, "EntryNotFound").header("X-Repo-Commit", repo.commit.clone());
            };
            let common = vec![("X-Repo-Commit".to_string(), repo.commit.clone())];
            if f.lfs {
                let mut a = Answer::new(302)
                    .header("Location", format!("http://127.0.0.1:{cdn_port}/lfs/{}", f.sha256))
                    .header("X-Linked-Etag", format!("\"{}\"", f.sha256))
                    .header("X-Linked-Size", f.bytes.len().to_string())
                    .header("ETag", format!("\"{}\"", f.sha256));
                a.headers.extend(common);
                a
            } else if method == "HEAD" || method == "GET" {
                let mut common = common;
                common.push(("ETag".into(), format!("\"{}\"", f.oid)));
                content(state, &file, f, headers, common)
            } else {
                Answer::error(404, "NotFound")
            }
        }
        _ => Answer::error(404, "NotFound"),
    }
}

/// A file's bytes, ranged and faulted as asked.
fn content(state: &State, name: &str, f: &File, headers: &BTreeMap<String, String>, extra: Vec<(String, String)>) -> Answer {
    let mut bytes = f.bytes.clone();
    let mut cut = None;
    {
        let mut faults = state.faults.lock().unwrap();
        for fault in faults.iter_mut() {
            match fault {
                Fault::Corrupt { file } if file == name => {
                    let i = bytes.len() / 2;
                    bytes[i] ^= 0x5a;
                }
                Fault::DropAfter { file, after, times } if file == name && *times > 0 => {
                    *times -= 1;
                    cut = Some(*after);
                }
                _ => {}
            }
        }
    }
    let total = bytes.len();
    let start = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let mut a = match start {
        Some(s) if s >= total => return Answer::new(416).header("Content-Range", format!("bytes */{total}")),
        Some(s) => {
            let mut a = Answer::new(206).header("Content-Range", format!("bytes {s}-{}/{total}", total - 1));
            a.body = bytes[s..].to_vec();
            a
        }
        None => {
            let mut a = Answer::new(200);
            a.body = bytes;
            a
        }
    };
    a.headers.push(("Accept-Ranges".into(), "bytes".into()));
    a.headers.extend(extra);
    a.cut = cut;
    a
}
