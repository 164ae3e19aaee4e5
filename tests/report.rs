//! report.html: escaping, path handling, and a real render in headless
//! Chromium that checks every image loads (and that a missing one is caught).
//!
//! Chromium is Debian's `chromium`, installed by `scripts/setup.sh`. Without it
//! the browser tests fail under `CI=true` and skip with a message elsewhere.
use orchestrate::rahf::Scores;
use orchestrate::report::{render, url_path, write_report, Report, ReportImage, ReportRow};
use orchestrate::scorers::{Comparison, ComparisonRow};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const HOSTILE_PROMPT: &str =
    "a cat & a dog <script>document.body.dataset.pwned = '1'</script><img src=x onerror=\"document.body.dataset.pwned='2'\">";

fn scores(p: f64) -> Scores {
    Scores { plausibility: p, alignment: 0.5, aesthetics: 0.25, overall: p * 0.9 }
}

fn write_png(dir: &Path, rel: &str, w: u32, h: u32, seed: u8) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w) as u8 ^ seed,
            (y * 255 / h) as u8,
            seed.wrapping_mul(37).wrapping_add((x + y) as u8),
        ])
    });
    img.save(&path).unwrap();
}

/// A report like an inpaint run's: originals with heatmap overlays and masks,
/// candidates with scores, one chosen per row; nasty file names on purpose.
fn sample(dir: &Path) -> (Report, usize) {
    let files: [(&str, u32, u32); 9] = [
        ("p0/original 0.png", 64, 64),
        ("p0/heatmap overlay.png", 64, 64),
        ("p0/mask.png", 64, 64),
        ("p0/cand #1?.png", 64, 64),
        ("p0/cand 2%.png", 64, 64),
        ("p1/ünïcödé ☃.png", 32, 32),
        ("p1/cand-1.png", 32, 32),
        ("p1/:colon.png", 48, 32),
        ("p2/only.png", 512, 384),
    ];
    for (i, (rel, w, h)) in files.iter().enumerate() {
        write_png(dir, rel, *w, *h, i as u8 * 29);
    }
    let report = Report {
        title: "inpaint <run> & friends".into(),
        job: "inpaint".into(),
        settings: serde_json::json!({
            "mask_threshold": 0.5,
            "dilate": 4,
            "candidates": 2,
            "models": {"generator": "models/sd tiny", "rahf": null},
            "sampling": {"steps": 4, "guidance_scale": 7.5, "size": [32, 32]},
            "note": "<b>not bold</b>",
        }),
        summary: vec![
            "3 prompts, 2 inpainted, 1 kept as it was".into(),
            "mean plausibility 0.412 → 0.618 <after>".into(),
        ],
        comparisons: vec![comparison()],
        rows: vec![
            ReportRow {
                prompt: HOSTILE_PROMPT.into(),
                id: "p0 & <co>".into(),
                images: vec![
                    ReportImage::new("p0/original 0.png", "original")
                        .with_scores(scores(0.31))
                        .with_overlay("implausibility", "p0/heatmap overlay.png")
                        .with_overlay("mask", "./p0//mask.png"),
                    ReportImage::new("p0/cand #1?.png", "candidate 1").with_scores(scores(0.72)).marked(true),
                    ReportImage::new("p0/cand 2%.png", "candidate 2").with_scores(scores(f64::NAN)),
                ],
                note: Some("mask covers 12% of the image".into()),
            },
            ReportRow {
                prompt: "a snowman\non two lines".into(),
                id: "p1".into(),
                images: vec![
                    ReportImage::new("p1/ünïcödé ☃.png", "original").with_scores(scores(0.5)),
                    ReportImage::new("p1/cand-1.png", "candidate 1").with_scores(scores(0.9)).marked(true),
                    ReportImage::new("p1/:colon.png", "colon in the name"),
                ],
                note: None,
            },
            ReportRow {
                prompt: "an empty mask".into(),
                id: "p2".into(),
                images: vec![ReportImage::new("p2/only.png", "original (kept)").marked(true)],
                note: Some("empty mask: kept as it is".into()),
            },
        ],
    };
    (report, files.len())
}

/// The optimised score and two held-out verifier scores, one without values.
fn comparison() -> Comparison {
    let row = |role: &str, name: &str, before: Option<f64>, after: Option<f64>| ComparisonRow {
        role: role.into(),
        name: name.into(),
        before,
        after,
        n_before: 3,
        n_after: 3,
    };
    Comparison {
        before: "original".into(),
        after: "chosen <best>".into(),
        rows: vec![
            row("optimised", "0.7*rahf:plausibility+0.3*rahf.b:aesthetics", Some(0.41), Some(0.6)),
            row("held-out", "rahf.c:overall", Some(0.5), Some(0.45)),
            row("held-out", "hpsv2<x>", None, None),
        ],
    }
}

#[test]
fn escapes_every_user_string() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = sample(dir.path());
    let html = render(&report).unwrap();
    // Exactly one <script> element: ours.
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(!html.contains("<img src=x"));
    assert!(html.contains(
        "a cat &amp; a dog &lt;script&gt;document.body.dataset.pwned = &#39;1&#39;&lt;/script&gt;"
    ));
    assert!(html.contains("onerror=&quot;"));
    assert!(html.contains("<title>inpaint &lt;run&gt; &amp; friends</title>"));
    assert!(html.contains("p0 &amp; &lt;co&gt;"));
    assert!(html.contains("&lt;b&gt;not bold&lt;/b&gt;"));
    assert!(html.contains("&lt;after&gt;"));
    // Settings flattened to dotted keys, arrays inline, null shown as a dash.
    assert!(html.contains("<th>sampling.steps</th><td>4</td>"), "{html}");
    assert!(html.contains("<th>sampling.size</th><td>32, 32</td>"));
    assert!(html.contains("<th>models.rahf</th><td>—</td>"));
    // A NaN score is shown as such, flagged.
    assert!(html.contains("<td class=\"bad\">NaN</td>"));
    // The optimised score and the held-out verifiers, before and after.
    assert!(html.contains("<th>original</th><th>chosen &lt;best&gt;</th><th>change</th>"), "{html}");
    assert!(html.contains(
        "<tr class=\"optimised\"><td class=\"name\">0.7*rahf:plausibility+0.3*rahf.b:aesthetics</td><td>optimised</td><td>0.4100</td><td>0.6000</td><td>+0.1900</td></tr>"
    ), "{html}");
    assert!(html.contains(
        "<tr class=\"held-out\"><td class=\"name\">rahf.c:overall</td><td>held-out</td><td>0.5000</td><td>0.4500</td><td>-0.0500</td></tr>"
    ), "{html}");
    assert!(html.contains("<td class=\"name\">hpsv2&lt;x&gt;</td><td>held-out</td><td>n/a</td><td>n/a</td><td>n/a</td>"), "{html}");
    // Exactly the marked images carry the badge.
    assert_eq!(html.matches("class=\"card marked\"").count(), 3);
    // No timestamp or other run-to-run noise: a resumed run rebuilds the same bytes.
    assert_eq!(html, render(&report).unwrap());
}

#[test]
fn image_paths_are_encoded_and_confined() {
    assert_eq!(url_path("a b/c#1?.png").unwrap(), "a%20b/c%231%3F.png");
    assert_eq!(url_path("ü ☃.png").unwrap(), "%C3%BC%20%E2%98%83.png");
    assert_eq!(url_path("./x//100%.png").unwrap(), "x/100%25.png");
    // A colon in the first segment must not read as a URL scheme.
    assert_eq!(url_path("javascript:alert(1)").unwrap(), "javascript%3Aalert%281%29");
    assert_eq!(url_path("a\"b'<c>.png").unwrap(), "a%22b%27%3Cc%3E.png");
    for bad in ["", ".", "./", "/etc/passwd", "../x.png", "a/../../x.png", "a/.."] {
        let err = url_path(bad).unwrap_err().to_string();
        assert!(err.contains("report image path"), "{bad:?}: {err}");
    }

    // write_report refuses before writing anything, naming the path.
    let dir = tempfile::tempdir().unwrap();
    let mut report = Report { job: "filter".into(), ..Default::default() };
    report.rows.push(ReportRow {
        prompt: "p".into(),
        id: "0".into(),
        images: vec![ReportImage::new("ok.png", "fine").with_overlay("mask", "../outside.png")],
        note: None,
    });
    let err = write_report(dir.path(), &report).unwrap_err().to_string();
    assert!(err.contains("../outside.png"), "{err}");
    assert!(!dir.path().join("report.html").exists());
}

#[test]
fn writes_report_atomically_into_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = sample(dir.path());
    let path = write_report(dir.path(), &report).unwrap();
    assert_eq!(path, dir.path().join("report.html"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), render(&report).unwrap());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `None` (after saying why) when the browser tests should skip.
fn chromium() -> Option<&'static str> {
    if Path::new(CHROMIUM).is_file() {
        return Some(CHROMIUM);
    }
    let ci = std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false);
    assert!(
        !ci,
        "{CHROMIUM} is missing under CI=true: scripts/setup.sh should have installed Debian's chromium"
    );
    eprintln!("SKIPPED: {CHROMIUM} is missing (run scripts/setup.sh); report.html was not rendered");
    None
}

fn run_chromium(browser: &str, mode_args: &[String], page: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    // Spaces and non-ASCII in the temp folder's name: encode it like the page does.
    let abs = page.to_str().unwrap().strip_prefix('/').unwrap();
    let url = format!("file:///{}", url_path(abs).unwrap());
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode_args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    // Read the pipes on threads so a chatty browser cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("chromium did not finish in 120 s; stderr:\n{}", err_t.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    assert!(status.success(), "chromium failed ({status}); stderr:\n{stderr}");
    stdout
}

fn attr(dom: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let start = dom.find(&key)? + key.len();
    Some(dom[start..][..dom[start..].find('"')?].to_string())
}

fn broken_list(dom: &str) -> Vec<String> {
    let Some(start) = dom.find("<ul id=\"broken-images\">") else {
        return vec!["<no #broken-images>".into()];
    };
    let list = &dom[start..];
    let list = &list[..list.find("</ul>").unwrap()];
    list.split("<li>").skip(1).map(|li| li.trim_end_matches("</li>").to_string()).collect()
}

/// The page as Chromium sees it after load: (total, loaded, broken srcs, DOM).
fn load_in_chromium(browser: &str, page: &Path) -> (usize, usize, Vec<String>, String) {
    let dom = run_chromium(browser, &["--dump-dom".to_string()], page);
    assert_eq!(attr(&dom, "data-images-checked").as_deref(), Some("1"), "the check did not run:\n{dom}");
    let total = attr(&dom, "data-images-total").unwrap().parse().unwrap();
    let loaded = attr(&dom, "data-images-loaded").unwrap().parse().unwrap();
    (total, loaded, broken_list(&dom), dom)
}

#[test]
fn every_image_loads_in_chromium() {
    let Some(browser) = chromium() else { return };
    // ORCHESTRATE_REPORT_SAMPLE=DIR keeps the sample report there (to look at it).
    let keep = std::env::var_os("ORCHESTRATE_REPORT_SAMPLE").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    // A space and non-ASCII in the folder too: the file:// URL and the
    // relative URLs must both survive it.
    let dir = keep.clone().unwrap_or_else(|| tmp.path().join("run out ü"));
    let (report, n_files) = sample(&dir);
    let page = write_report(&dir, &report).unwrap();

    let (total, loaded, broken, dom) = load_in_chromium(browser, &page);
    // Every file appears once as a main image or overlay.
    assert_eq!(total, n_files, "{dom}");
    assert_eq!((loaded, broken.clone()), (n_files, vec![]), "{dom}");
    // The hostile prompt stayed text: neither its <script> nor its onerror ran.
    assert!(!dom.contains("data-pwned"), "{dom}");
    assert!(dom.contains("&lt;script&gt;"), "{dom}");
    assert!(dom.contains("id=\"image-check\" hidden"), "banner shown with no broken image:\n{dom}");
    // Small images are upscaled with crisp pixels; the large one is not.
    assert!(dom.contains("class=\"px\""), "{dom}");
    // The verifier table is in the rendered page, escaped.
    assert!(dom.contains("Optimised and held-out scores"), "{dom}");
    assert!(dom.contains("<td class=\"name\">rahf.c:overall</td><td>held-out</td><td>0.5000</td><td>0.4500</td>"), "{dom}");
    assert!(dom.contains("hpsv2&lt;x&gt;"), "{dom}");

    if let Some(keep) = keep {
        let shot = keep.join("screenshot.png");
        run_chromium(
            browser,
            &[format!("--screenshot={}", shot.display()), "--window-size=1280,1400".to_string()],
            &page,
        );
        eprintln!("sample report: {}, screenshot: {}", page.display(), shot.display());
    }
}

#[test]
fn chromium_check_catches_a_missing_image() {
    let Some(browser) = chromium() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (report, n_files) = sample(tmp.path());
    std::fs::remove_file(tmp.path().join("p1/ünïcödé ☃.png")).unwrap();
    std::fs::write(tmp.path().join("p0/mask.png"), b"not a png").unwrap();
    let page = write_report(tmp.path(), &report).unwrap();

    let (total, loaded, broken, dom) = load_in_chromium(browser, &page);
    assert_eq!(total, n_files);
    assert_eq!(loaded, n_files - 2, "{dom}");
    assert_eq!(broken, vec!["p0/mask.png".to_string(), "p1/ünïcödé ☃.png".to_string()], "{dom}");
    assert!(!dom.contains("id=\"image-check\" hidden"), "the banner should show:\n{dom}");
    assert!(dom.contains("2 of 9 images did not load:"), "{dom}");
}
