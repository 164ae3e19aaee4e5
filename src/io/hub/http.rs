//! The Hub's HTTP endpoints, as huggingface_hub calls them: revision info,
//! the tree listing, `HEAD`/`GET .../resolve/<commit>/<file>` (with
//! `X-Repo-Commit`, `ETag`, and for LFS files `X-Linked-Etag` = SHA-256,
//! `X-Linked-Size`, a redirect to the blob), and ranged `GET`s to resume.
use super::cache::TreeEntry;
use super::HubError;
use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

/// A blocking client for one endpoint; sends the token only to Hub origins
/// (the endpoint, huggingface.co, hf.co), never to the storage an LFS file
/// redirects to, as huggingface_hub does.
pub struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

/// What a `HEAD` of a file's resolve URL says.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub file: String,
    pub commit: String,
    /// `X-Linked-Etag` (an LFS file's SHA-256) or `ETag` (git blob id), unquoted.
    pub etag: String,
    pub size: Option<u64>,
    /// Where to `GET` it: the redirect's target for LFS files, else the resolve URL.
    pub location: String,
    /// The resolve URL (named in errors).
    pub url: String,
}

impl FileMeta {
    /// An LFS file's etag is its SHA-256 (64 hex digits): checked after download.
    pub fn sha256(&self) -> Option<&str> {
        (self.etag.len() == 64 && self.etag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(self.etag.as_str())
    }
}

/// `s` percent-encoded as Python's `urllib.parse.quote(s, safe)`.
pub fn quote(s: &str, safe: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || safe.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn origin(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let end = rest.find('/').unwrap_or(rest.len());
    Some(&url[..url.len() - rest.len() + end])
}

/// `location` (a `Location` header) against the URL it answered.
fn join(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base).unwrap_or(""))
    } else {
        match base.rfind('/') {
            Some(i) => format!("{}{location}", &base[..=i]),
            None => location.to_string(),
        }
    }
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `W/"abc"` / `"abc"` → `abc`, as huggingface_hub's `_normalize_etag`.
fn normalize_etag(etag: &str) -> String {
    etag.trim_start_matches("W/").trim_matches('"').to_string()
}

/// A name the cache may use as one path component (an etag, a commit).
pub fn safe_component(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0']) && s.len() <= 255
}

/// A transport failure (no HTTP answer): DNS, refused, reset, timeout.
fn unreachable(url: &str, e: ureq::Error) -> HubError {
    HubError::Unreachable { url: url.to_string(), reason: e.to_string() }
}

/// The error for an HTTP status, with the Hub's `X-Error-Code` /
/// `X-Error-Message` and what to do about it.
fn status_error(url: &str, resp: &ureq::http::Response<ureq::Body>, token: bool) -> HubError {
    let status = resp.status().as_u16();
    let code = header(resp, "x-error-code").unwrap_or_default();
    let server = header(resp, "x-error-message").map(|m| format!(": {m}")).unwrap_or_default();
    let hint = match (status, code.as_str()) {
        (_, "RepoNotFound") | (401, _) if !token => {
            " (the repo does not exist, or it is private or gated: set HF_TOKEN to a token that can read it)"
        }
        (_, "RepoNotFound") | (401, _) => " (the repo does not exist, or HF_TOKEN cannot read it)",
        (_, "GatedRepo") | (403, _) => " (a gated repo: accept its conditions on its Hub page, and set HF_TOKEN)",
        (_, "RevisionNotFound") => " (no such branch, tag or commit)",
        (_, "EntryNotFound") => " (no such file at this revision)",
        (429, _) => " (rate limited; try again later)",
        _ => "",
    };
    let reason = resp.status().canonical_reason().unwrap_or("");
    HubError::Http { url: url.to_string(), status, message: format!("HTTP {status} {reason}{server}{hint}") }
}

fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl Client {
    pub fn new(endpoint: &str, token: Option<String>, timeout: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            .user_agent(concat!("orchestrate/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { agent, endpoint: endpoint.trim_end_matches('/').to_string(), token }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// huggingface_hub's `_HUB_ORIGINS`: the endpoint and the Hub's own hosts.
    fn hub_origin(&self, url: &str) -> bool {
        let Some(o) = origin(url) else { return false };
        Some(o) == origin(&self.endpoint) || o == "https://huggingface.co" || o == "https://hf.co"
    }

    fn request(&self, method: &str, url: &str, range_from: Option<u64>) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut req = ureq::http::Request::builder().method(method).uri(url).header("Accept-Encoding", "identity");
        if let (Some(token), true) = (&self.token, self.hub_origin(url)) {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(from) = range_from.filter(|&n| n > 0) {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let req = req.body(()).map_err(ureq::Error::from)?;
        self.agent.run(req)
    }

    /// `GET` of a JSON API URL.
    fn get_json(&self, url: &str) -> Result<(serde_json::Value, Option<String>), HubError> {
        let mut resp = self.request("GET", url, None).map_err(|e| unreachable(url, e))?;
        if !resp.status().is_success() {
            return Err(status_error(url, &resp, self.token.is_some()));
        }
        let link = header(&resp, "link");
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|e| HubError::Protocol { url: url.into(), reason: format!("reading the answer: {e}") })?;
        let v = serde_json::from_str(&text)
            .map_err(|e| HubError::Protocol { url: url.into(), reason: format!("the answer is not JSON: {e}") })?;
        Ok((v, link))
    }

    /// `GET /api/models/REPO/revision/REV`: the commit and every file path.
    pub fn revision(&self, repo: &str, revision: &str) -> Result<(String, Vec<String>), HubError> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, quote(revision, ""));
        let (v, _) = self.get_json(&url)?;
        let bad = |what: &str| HubError::Protocol { url: url.clone(), reason: format!("the answer has no {what}") };
        let sha = v.get("sha").and_then(|s| s.as_str()).ok_or_else(|| bad("`sha`"))?.to_string();
        if !safe_component(&sha) {
            return Err(HubError::Protocol { url, reason: format!("commit `{sha}` is not a usable name") });
        }
        let siblings = v.get("siblings").and_then(|s| s.as_array()).ok_or_else(|| bad("`siblings`"))?;
        let mut files = Vec::with_capacity(siblings.len());
        for s in siblings {
            files.push(s.get("rfilename").and_then(|f| f.as_str()).ok_or_else(|| bad("`siblings[].rfilename`"))?.to_string());
        }
        Ok((sha, files))
    }

    /// `GET /api/models/REPO/tree/COMMIT?recursive=true` (following `Link:
    /// <...>; rel="next"` pages): every file with its size and LFS SHA-256.
    /// `None` when the endpoint has no such API (a plain mirror).
    pub fn tree(&self, repo: &str, commit: &str) -> Result<Option<BTreeMap<String, TreeEntry>>, HubError> {
        let mut url = format!("{}/api/models/{repo}/tree/{}?recursive=true&expand=false", self.endpoint, quote(commit, ""));
        let mut out = BTreeMap::new();
        for _page in 0..10_000 {
            let (v, link) = match self.get_json(&url) {
                Ok(x) => x,
                Err(HubError::Http { status: 404 | 405 | 501, .. }) if out.is_empty() => return Ok(None),
                Err(e) => return Err(e),
            };
            let entries = v.as_array().ok_or_else(|| HubError::Protocol { url: url.clone(), reason: "the answer is not a list".into() })?;
            for e in entries {
                if e.get("type").and_then(|t| t.as_str()) != Some("file") {
                    continue;
                }
                let bad = || HubError::Protocol { url: url.clone(), reason: format!("malformed entry {e}") };
                let path = e.get("path").and_then(|p| p.as_str()).ok_or_else(bad)?.to_string();
                let lfs = e.get("lfs").filter(|l| !l.is_null());
                out.insert(
                    path,
                    TreeEntry {
                        size: e.get("size").and_then(|s| s.as_u64()).ok_or_else(bad)?,
                        blob_id: e.get("oid").and_then(|s| s.as_str()).ok_or_else(bad)?.to_string(),
                        lfs_sha256: lfs.and_then(|l| l.get("oid")).and_then(|s| s.as_str()).map(str::to_string),
                        lfs_size: lfs.and_then(|l| l.get("size")).and_then(|s| s.as_u64()),
                        xet_hash: e.get("xetHash").and_then(|s| s.as_str()).map(str::to_string),
                    },
                );
            }
            match link.as_deref().and_then(next_link) {
                Some(next) => url = join(&url, &next),
                None => return Ok(Some(out)),
            }
        }
        Err(HubError::Protocol { url, reason: "more than 10000 pages of files".into() })
    }

    /// `HEAD` of `resolve/<commit>/<file>`, following redirects that stay on
    /// the Hub (same origin, or a Hub origin: a renamed repo) as
    /// huggingface_hub does; one to another origin is where the LFS blob
    /// lives, and its own headers describe the file.
    pub fn head(&self, repo: &str, commit: &str, file: &str) -> Result<FileMeta, HubError> {
        let url = format!("{}/{repo}/resolve/{}/{}", self.endpoint, quote(commit, ""), quote(file, "/"));
        let mut at = url.clone();
        for _ in 0..10 {
            let resp = self.request("HEAD", &at, None).map_err(|e| unreachable(&at, e))?;
            let status = resp.status();
            let location = header(&resp, "location");
            if status.is_redirection() {
                if let Some(loc) = location.as_deref() {
                    let target = join(&at, loc);
                    if origin(&target) == origin(&at) || self.hub_origin(&target) {
                        at = target;
                        continue;
                    }
                }
            } else if !status.is_success() {
                return Err(status_error(&at, &resp, self.token.is_some()));
            }
            let bad = |what: &str| HubError::Protocol {
                url: at.clone(),
                reason: format!("no {what} header: is HF_ENDPOINT a Hugging Face Hub?"),
            };
            let commit_seen = header(&resp, "x-repo-commit").ok_or_else(|| bad("X-Repo-Commit"))?;
            let etag = header(&resp, "x-linked-etag").or_else(|| header(&resp, "etag")).ok_or_else(|| bad("ETag"))?;
            let etag = normalize_etag(&etag);
            if !safe_component(&etag) || !safe_component(&commit_seen) {
                return Err(HubError::Protocol { url: at, reason: format!("unusable ETag `{etag}` or commit `{commit_seen}`") });
            }
            let size = header(&resp, "x-linked-size")
                .or_else(|| if status.is_redirection() { None } else { header(&resp, "content-length") })
                .and_then(|s| s.parse().ok());
            let location = match location {
                Some(loc) if status.is_redirection() => join(&at, &loc),
                _ => at.clone(),
            };
            return Ok(FileMeta { file: file.to_string(), commit: commit_seen, etag, size, location, url });
        }
        Err(HubError::Protocol { url, reason: "too many redirects".into() })
    }

    /// A `GET` of `url` from byte `from` on, following redirects (the token
    /// goes only to the endpoint's own origin). Transport errors are
    /// returned as `Err(None-status)`, the caller retries them.
    pub fn get_from(&self, url: &str, from: u64) -> Result<ureq::http::Response<ureq::Body>, GetError> {
        let mut at = url.to_string();
        for _ in 0..10 {
            let resp = self.request("GET", &at, Some(from)).map_err(|e| GetError::Transport(e.to_string()))?;
            if resp.status().is_redirection() {
                if let Some(loc) = header(&resp, "location") {
                    at = join(&at, &loc);
                    continue;
                }
            }
            if resp.status().is_success() || resp.status().as_u16() == 416 {
                return Ok(resp);
            }
            let status = resp.status().as_u16();
            let err = status_error(&at, &resp, self.token.is_some());
            return Err(if retryable(status) { GetError::Transport(err.to_string()) } else { GetError::Fatal(err) });
        }
        Err(GetError::Fatal(HubError::Protocol { url: url.into(), reason: "too many redirects".into() }))
    }
}

/// Why a `GET` gave no body: worth retrying, or not.
pub enum GetError {
    Transport(String),
    Fatal(HubError),
}

/// The URL of `Link: <url>; rel="next"`.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find(|part| part.contains("rel=\"next\"")).and_then(|part| {
        let start = part.find('<')? + 1;
        let end = part.find('>')?;
        (start < end).then(|| part[start..end].to_string())
    })
}

/// `Content-Range: bytes START-END/TOTAL` → START.
pub fn content_range_start(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    let v = header(resp, "content-range")?;
    let rest = v.strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

/// Reads a response body into `sink` in chunks, calling `progress` after
/// each; returns the bytes read and, if the stream broke, why.
pub fn stream_body(
    resp: ureq::http::Response<ureq::Body>,
    sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> (u64, Option<String>) {
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return (total, None),
            Ok(n) => {
                if let Err(e) = sink(&buf[..n]) {
                    return (total, Some(format!("writing: {e}")));
                }
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return (total, Some(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_quoted_and_joined_like_python() {
        assert_eq!(quote("refs/pr/1", ""), "refs%2Fpr%2F1");
        assert_eq!(quote("unet/a b+.json", "/"), "unet/a%20b%2B.json");
        assert_eq!(join("http://h:1/a/b", "/c/d"), "http://h:1/c/d");
        assert_eq!(join("http://h:1/a/b", "https://cdn/x"), "https://cdn/x");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(next_link("<https://h/api?cursor=x>; rel=\"next\""), Some("https://h/api?cursor=x".into()));
        assert!(!safe_component("../x") && !safe_component("..") && safe_component("abc123"));
    }
}
