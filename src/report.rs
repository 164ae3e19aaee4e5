//! `report.html`: one self-contained page per run, for people to look at.
//!
//! Job-agnostic: a job describes its run as a [`Report`] (settings, summary
//! lines, and per prompt a row of images with their scores and overlays) and
//! [`write_report`] renders it. The page has inline CSS and a few lines of
//! inline JS, references only files inside the report's folder by relative
//! URL, and so opens from disk (or any static file server) with no network.
//!
//! Every string is HTML-escaped (prompts are user text) and every image path
//! is percent-encoded segment by segment (file names with spaces, `#`, `?`,
//! `%` or non-ASCII characters). Paths that could leave the report's folder
//! (absolute, `..`) are refused, so a report never shows files from elsewhere.
//!
//! The output depends only on the [`Report`] (no timestamp), so a resumed run
//! that rebuilds its report from the manifest writes the same bytes as an
//! uninterrupted one.
//!
//! After the page loads, its script counts the images that decoded and lists
//! the ones that did not, on `<body data-images-total data-images-loaded>` and
//! in `#broken-images`; a visible banner names broken images, and the tests
//! read the same attributes from headless Chromium.
use crate::error::{Error, Result};
use crate::rahf::Scores;
use crate::scorers::{Comparison, RawScores, ScoreSpec};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The file name [`write_report`] writes inside the run's folder.
pub const REPORT_FILE: &str = "report.html";

/// One run, as the report shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// The page's heading and `<title>`.
    pub title: String,
    /// The job's name (`filter`, `inpaint`, `guide`), shown as a badge.
    pub job: String,
    /// The run's options; nested objects are flattened to dotted keys in a
    /// table (`sampling.steps`). `Null` shows no table.
    pub settings: serde_json::Value,
    /// Free-form lines shown at the top (counts, means, histograms).
    pub summary: Vec<String>,
    /// The optimised score and every held-out verifier, before and after
    /// (filter: all vs kept; inpaint: original vs chosen; guide: unguided vs
    /// guided, and best-of-N vs guided), each shown as a table at the top.
    pub comparisons: Vec<Comparison>,
    /// One row per prompt, in this order.
    pub rows: Vec<ReportRow>,
}

/// One prompt and the images made for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReportRow {
    pub prompt: String,
    pub id: String,
    pub images: Vec<ReportImage>,
    /// Shown under the prompt, e.g. "empty mask: kept as it is" or "below threshold".
    pub note: Option<String>,
}

/// One image of a row, with what belongs to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReportImage {
    /// Relative to the report's folder, `/`-separated.
    pub path: String,
    /// Shown under the image, e.g. "seed 42" or "candidate 3".
    pub caption: String,
    /// `(name, value)` shown under the image, in this order.
    pub scores: Vec<(String, f64)>,
    /// The kept / chosen image of its row: outlined and badged.
    pub marked: bool,
    /// `(label, relative path)` thumbnails beside the image: heatmap overlays, masks.
    pub overlays: Vec<(String, String)>,
}

impl ReportImage {
    pub fn new(path: impl Into<String>, caption: impl Into<String>) -> Self {
        ReportImage { path: path.into(), caption: caption.into(), ..Default::default() }
    }
    /// RAHF's four scores under their names.
    pub fn with_scores(mut self, s: Scores) -> Self {
        for (name, v) in [
            ("plausibility", s.plausibility),
            ("alignment", s.alignment),
            ("aesthetics", s.aesthetics),
            ("overall", s.overall),
        ] {
            self.scores.push((name.into(), v));
        }
        self
    }

    pub fn with_score(mut self, name: impl Into<String>, value: f64) -> Self {
        self.scores.push((name.into(), value));
        self
    }

    /// The spec's value as `score` (unless the spec is one RAHF score, shown
    /// among the raw ones anyway), then every raw score: the instance
    /// `rahf`'s under their own names, others as `INSTANCE:SCORE`.
    pub fn with_spec_and_raw(mut self, spec: &ScoreSpec, value: f64, raw: &RawScores) -> Self {
        if spec.legacy().is_none() {
            self = self.with_score("score", value);
        }
        for (inst, scores) in raw {
            for (name, v) in scores {
                let label = if inst == "rahf" {
                    name.clone()
                } else if crate::scorers::type_of(inst).is_ok_and(|i| i.single()) {
                    inst.clone()
                } else {
                    format!("{inst}:{name}")
                };
                self = self.with_score(label, v.unwrap_or(f64::NAN));
            }
        }
        self
    }
    pub fn marked(mut self, marked: bool) -> Self {
        self.marked = marked;
        self
    }
    pub fn with_overlay(mut self, label: impl Into<String>, path: impl Into<String>) -> Self {
        self.overlays.push((label.into(), path.into()));
        self
    }
}

/// Renders `report` and writes `dir/report.html` atomically (temporary file +
/// rename); returns its path. Fails before writing anything if an image path
/// would leave `dir`. Images that do not exist (yet) are only warned about:
/// the page shows them as broken.
pub fn write_report(dir: &Path, report: &Report) -> Result<PathBuf> {
    let html = render(report)?;
    for rel in image_paths(report) {
        if !dir.join(rel).is_file() {
            tracing::warn!(
                "report: {} does not exist (yet); it will show as broken",
                dir.join(rel).display()
            );
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(REPORT_FILE);
    crate::io::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

fn image_paths(report: &Report) -> impl Iterator<Item = &str> {
    report.rows.iter().flat_map(|row| {
        row.images.iter().flat_map(|im| {
            std::iter::once(im.path.as_str()).chain(im.overlays.iter().map(|(_, p)| p.as_str()))
        })
    })
}

/// The page as a string; [`write_report`] is this plus the atomic write.
pub fn render(report: &Report) -> Result<String> {
    let n_images: usize = report.rows.iter().map(|r| r.images.len()).sum();
    let mut h = String::with_capacity(4096 + 1024 * n_images);
    let title = if report.title.is_empty() { format!("{} report", report.job) } else { report.title.clone() };

    h.push_str("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    // Only inline style/script and local images: the page never touches the network.
    h.push_str(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n",
    );
    let _ = writeln!(h, "<title>{}</title>", esc(&title));
    h.push_str("<style>");
    h.push_str(CSS);
    h.push_str("</style>\n</head>\n<body>\n<header>\n");
    let _ = writeln!(h, "<h1>{}</h1>", esc(&title));
    let _ = writeln!(
        h,
        "<div class=\"meta\"><span class=\"job\">{}</span> {} prompt{}, {} image{}</div>",
        esc(&report.job),
        report.rows.len(),
        plural(report.rows.len()),
        n_images,
        plural(n_images)
    );
    h.push_str("</header>\n<main>\n");
    h.push_str("<div id=\"image-check\" hidden><b></b><ul id=\"broken-images\"></ul></div>\n");

    h.push_str("<div class=\"top\">\n");
    if !report.summary.is_empty() {
        h.push_str("<section class=\"panel summary\"><h2>Summary</h2><ul>\n");
        for line in &report.summary {
            let _ = writeln!(h, "<li>{}</li>", esc(line));
        }
        h.push_str("</ul></section>\n");
    }
    for c in report.comparisons.iter().filter(|c| !c.rows.is_empty()) {
        render_comparison(&mut h, c);
    }
    let settings = flatten_settings(&report.settings);
    if !settings.is_empty() {
        h.push_str("<section class=\"panel settings\"><h2>Settings</h2><table>\n");
        for (k, v) in &settings {
            let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
        }
        h.push_str("</table></section>\n");
    }
    h.push_str("</div>\n");

    for row in &report.rows {
        render_row(&mut h, row)?;
    }
    if report.rows.is_empty() {
        h.push_str("<p class=\"empty\">No prompts in this run.</p>\n");
    }
    h.push_str("</main>\n<script>");
    h.push_str(SCRIPT);
    h.push_str("</script>\n</body>\n</html>\n");
    Ok(h)
}

/// The optimised score and the held-out verifiers, before and after.
fn render_comparison(h: &mut String, c: &Comparison) {
    let num = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    let _ = writeln!(
        h,
        "<section class=\"panel comparison\"><h2>Optimised and held-out scores: {} vs {}</h2><table>",
        esc(&c.before),
        esc(&c.after)
    );
    let _ = writeln!(
        h,
        "<tr><th>score</th><th>role</th><th>{}</th><th>{}</th><th>change</th></tr>",
        esc(&c.before),
        esc(&c.after)
    );
    for r in &c.rows {
        let change = r.change().map_or("n/a".to_string(), |d| format!("{d:+.4}"));
        let _ = writeln!(
            h,
            "<tr class=\"{role}\"><td class=\"name\">{}</td><td>{role}</td><td>{}</td><td>{}</td><td>{change}</td></tr>",
            esc(&r.name),
            num(r.before),
            num(r.after),
            role = esc(&r.role)
        );
    }
    h.push_str("</table></section>\n");
}

fn render_row(h: &mut String, row: &ReportRow) -> Result<()> {
    h.push_str("<section class=\"row\">\n<div class=\"row-head\">");
    if !row.id.is_empty() {
        let _ = write!(h, "<span class=\"id\">{}</span>", esc(&row.id));
    }
    let _ = write!(h, "<p class=\"prompt\">{}</p>", esc(&row.prompt));
    if let Some(note) = &row.note {
        let _ = write!(h, "<p class=\"note\">{}</p>", esc(note));
    }
    h.push_str("</div>\n<div class=\"images\">\n");
    for im in &row.images {
        let src = url_path(&im.path)?;
        let _ = writeln!(h, "<figure class=\"card{}\">", if im.marked { " marked" } else { "" });
        if im.marked {
            h.push_str("<span class=\"badge\">&#9733; kept</span>");
        }
        h.push_str("<div class=\"card-body\">");
        let _ = write!(
            h,
            "<a class=\"main\" href=\"{src}\"><img src=\"{src}\" alt=\"{alt}\" title=\"{alt}\"></a>",
            alt = esc(&im.caption)
        );
        if !im.overlays.is_empty() {
            h.push_str("<div class=\"overlays\">");
            for (label, path) in &im.overlays {
                let osrc = url_path(path)?;
                let _ = write!(
                    h,
                    "<a class=\"overlay\" href=\"{osrc}\"><img src=\"{osrc}\" alt=\"{l}\" title=\"{l}\"><span>{l}</span></a>",
                    l = esc(label)
                );
            }
            h.push_str("</div>");
        }
        h.push_str("</div>\n<figcaption>");
        let _ = write!(h, "<div class=\"caption\">{}</div>", esc(&im.caption));
        if !im.scores.is_empty() {
            h.push_str("<table class=\"scores\">");
            for (name, v) in &im.scores {
                let (class, text) =
                    if v.is_finite() { ("", format!("{v:.3}")) } else { (" class=\"bad\"", format!("{v}")) };
                let _ = write!(h, "<tr><th>{}</th><td{class}>{text}</td></tr>", esc(name));
            }
            h.push_str("</table>");
        }
        h.push_str("</figcaption>\n</figure>\n");
    }
    if row.images.is_empty() {
        h.push_str("<p class=\"empty\">No images.</p>\n");
    }
    h.push_str("</div>\n</section>\n");
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Escapes text for HTML content and (double- or single-quoted) attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Turns a `/`-separated path relative to the report's folder into a relative
/// URL: each segment's UTF-8 bytes percent-encoded except RFC 3986's
/// unreserved characters, so `:` cannot start a scheme, `#`/`?` cannot cut
/// the path, and spaces and non-ASCII names survive. Refuses empty, absolute
/// and `..` paths: the report shows only files inside its own folder.
pub fn url_path(path: &str) -> Result<String> {
    let refuse = |why: &str| Error::Invalid(format!("report image path `{path}` {why}"));
    if path.is_empty() {
        return Err(refuse("is empty"));
    }
    if path.starts_with('/') || Path::new(path).is_absolute() {
        return Err(refuse("is absolute; paths must be relative to the report's folder"));
    }
    let mut segments = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => continue,
            ".." => return Err(refuse("leaves the report's folder (`..`)")),
            _ => segments.push(percent_encode(seg)),
        }
    }
    if segments.is_empty() {
        return Err(refuse("names no file"));
    }
    Ok(segments.join("/"))
}

fn percent_encode(seg: &str) -> String {
    let mut out = String::with_capacity(seg.len());
    for &b in seg.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `{"a": {"b": 1}, "c": [1, 2]}` → `[("a.b", "1"), ("c", "1, 2")]`. A scalar
/// or array at the top shows as one row named `value`.
fn flatten_settings(v: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        use serde_json::Value;
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            _ => {
                let key = if prefix.is_empty() { "value".to_string() } else { prefix.to_string() };
                out.push((key, scalar_text(v)));
            }
        }
    }
    let mut out = Vec::new();
    if !v.is_null() {
        walk("", v, &mut out);
    }
    out
}

fn scalar_text(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "—".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|x| !x.is_object() && !x.is_array()) => {
            items.iter().map(scalar_text).collect::<Vec<_>>().join(", ")
        }
        other => other.to_string(),
    }
}

const CSS: &str = r#"
:root{--fg:#1d2430;--muted:#5b6573;--line:#dde1e6;--bg:#f4f5f7;--ok:#1a7f37;--bad:#c62828}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:var(--fg);color:#fff;padding:14px 24px}
h1{margin:0;font-size:20px;font-weight:600;overflow-wrap:anywhere}
.meta{margin-top:4px;color:#c9d1dc}
.job{display:inline-block;background:#3b82f6;color:#fff;border-radius:10px;padding:0 8px;margin-right:6px;font-weight:600}
main{padding:16px 24px}
h2{font-size:14px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.top{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.panel{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;min-width:260px;max-width:100%}
.summary ul{margin:0;padding-left:18px}
.settings table{border-collapse:collapse}
.settings th,.settings td{text-align:left;padding:2px 12px 2px 0;vertical-align:baseline;border-bottom:1px solid #f0f2f4}
.comparison table{border-collapse:collapse;font-variant-numeric:tabular-nums}
.comparison th,.comparison td{text-align:right;padding:2px 10px;border-bottom:1px solid #f0f2f4}
.comparison td.name,.comparison th:first-child{text-align:left;font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.comparison tr.optimised td{font-weight:600}
.settings th{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;color:var(--muted);font-weight:400;white-space:nowrap}
.settings td{overflow-wrap:anywhere}
.row{background:#fff;border:1px solid var(--line);border-radius:8px;margin:16px 0;padding:12px 16px}
.row-head{margin-bottom:10px}
.id{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;color:var(--muted)}
.prompt{margin:2px 0 0;font-size:15px;white-space:pre-wrap;overflow-wrap:anywhere}
.note{margin:4px 0 0;color:var(--muted);font-style:italic}
.images{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{position:relative;margin:0;padding:8px;border:2px solid var(--line);border-radius:8px;background:#fafbfc}
.card.marked{border-color:var(--ok);box-shadow:0 0 0 3px rgba(26,127,55,.25);background:#f3fbf5}
.badge{position:absolute;top:-10px;left:8px;background:var(--ok);color:#fff;font-size:12px;font-weight:600;padding:0 8px;border-radius:10px;z-index:1}
.card-body{display:flex;gap:8px;align-items:flex-start}
.main img{display:block;width:192px;height:auto;border-radius:4px;background:#e8ebef}
.overlays{display:grid;grid-template-columns:repeat(2,84px);gap:6px}
.overlay{display:block;color:var(--muted);font-size:11px;text-decoration:none;text-align:center;overflow-wrap:anywhere}
.overlay img{display:block;width:84px;height:auto;border-radius:3px;background:#e8ebef}
figcaption{margin-top:6px;max-width:192px}
.caption{font-weight:600;overflow-wrap:anywhere}
.scores{border-collapse:collapse;font-size:12px;margin-top:2px}
.scores th{text-align:left;font-weight:400;color:var(--muted);padding-right:10px}
.scores td{text-align:right;font-variant-numeric:tabular-nums}
.marked .scores td{font-weight:600}
.bad{color:var(--bad);font-weight:600}
.px{image-rendering:pixelated}
.empty{color:var(--muted)}
#image-check{background:#fdecea;border:1px solid var(--bad);color:var(--bad);border-radius:8px;padding:8px 16px;margin-bottom:16px}
#image-check ul{margin:4px 0 0;padding-left:18px;font:12px ui-monospace,monospace}
"#;

/// Runs once everything has loaded or failed: records which images decoded
/// (for the banner and for tests), and shows small images (tiny test models
/// make 32×32 ones) with crisp pixels instead of a blur.
const SCRIPT: &str = r#"
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("main img"), ok = 0, list = document.getElementById("broken-images");
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i];
    if (im.complete && im.naturalWidth > 0) {
      ok++;
      if (im.naturalWidth < im.clientWidth) im.classList.add("px");
    } else {
      var li = document.createElement("li");
      li.textContent = decodeURIComponent(im.getAttribute("src"));
      list.appendChild(li);
    }
  }
  var b = document.body.dataset;
  b.imagesTotal = imgs.length;
  b.imagesLoaded = ok;
  if (ok < imgs.length) {
    var box = document.getElementById("image-check");
    box.firstChild.textContent = (imgs.length - ok) + " of " + imgs.length + " images did not load:";
    box.hidden = false;
  }
  b.imagesChecked = "1";
});
"#;
