//! `orchestrate guide` end to end on tiny models: guided images score higher
//! than unguided ones on the same seeds, every output and the report are
//! written, and a rerun does nothing twice.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_orchestrate"))
}

/// `guide` on the tiny SD pipeline with `rahf` and `prompts`.
fn guide(rahf: &Path, prompts: &Path) -> Command {
    let mut c = bin();
    c.args(["guide", "--model"])
        .arg(root().join("tests/fixtures/diffusion/sd-tiny"))
        .arg("--rahf")
        .arg(rahf)
        .arg("--prompts")
        .arg(prompts);
    c
}

fn tiny_rahf(dir: &Path) -> PathBuf {
    let out = dir.join("rahf");
    common::import_tiny_rahf(&out);
    out
}

#[test]
fn guidance_raises_the_score_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tiny_rahf(tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red cat\na blue dog on a chair\n").unwrap();
    let out = tmp.path().join("out");
    let run = || {
        guide(&rahf, &prompts)
            .args(["--images-per-prompt", "2", "--steps", "4", "--height", "32", "--width", "32"])
            .args(["--guidance-strength", "50", "--seed", "11", "--json", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = &summary["figures"];
    assert_eq!(f["images"], 4);
    assert_eq!(f["compared"], 4);
    let (g, u) = (f["mean_guided"].as_f64().unwrap(), f["mean_unguided"].as_f64().unwrap());
    assert!(g > u, "guided {g} should beat unguided {u}");
    let ids: Vec<String> =
        orchestrate::jobs::prompts::read_prompts(&prompts).unwrap().into_iter().map(|p| p.id).collect();
    for k in 0..2 {
        for dir in ["guided", "unguided"] {
            assert!(out.join(format!("{dir}/{}_{k}.png", ids[1])).is_file());
        }
    }
    let guided = image::open(out.join(format!("guided/{}_0.png", ids[0]))).unwrap().to_rgb8();
    let unguided = image::open(out.join(format!("unguided/{}_0.png", ids[0]))).unwrap().to_rgb8();
    assert_ne!(guided, unguided, "guidance changed nothing");
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains(&format!("guided/{}_1.png", ids[1])) && report.contains("a blue dog on a chair"));

    let manifest = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    let o = run();
    assert!(o.status.success());
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["figures"]["new"], 0);
    assert_eq!(again["figures"]["skipped_done"], 2);
    assert_eq!(std::fs::read_to_string(out.join("manifest.jsonl")).unwrap(), manifest);
}

#[test]
fn bad_guide_settings_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "x\n").unwrap();
    for (flag, value, needle) in [
        ("--score", "beauty", "beauty"),
        ("--guide-every", "0", "every"),
        ("--recurrence", "0", "recurrence"),
        ("--guidance-strength=-1", "", "strength"),
    ] {
        let o = bin()
            .args(["guide", "--model", "m", "--rahf", "r", "--prompts"])
            .arg(&prompts)
            .args([flag, value].into_iter().filter(|a| !a.is_empty()))
            .arg("--out")
            .arg(tmp.path().join("o"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{flag} {value}: {err}");
    }
}

/// `--guide-decoder tiny:DIR` decodes x̂0 with a TAESD of the pipeline's
/// latent space for the gradient: it runs end to end, guides (the images
/// differ from unguided ones and from VAE-guided ones), is part of the run's
/// settings, and a decoder of another latent space is refused before anything
/// is written.
#[test]
fn a_tiny_decoder_guides_and_a_mismatched_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let rahf = tiny_rahf(tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red cat\n").unwrap();
    let taesd = root().join("tests/fixtures/taesd/sd-tiny-taesd");
    let run = |out: &Path, decoder: &str| {
        guide(&rahf, &prompts)
            .args(["--steps", "4", "--height", "32", "--width", "32", "--guidance-strength", "50", "--seed", "11"])
            .args(["--guide-decoder", decoder, "--json", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let tiny = format!("tiny:{}", taesd.display());
    let (out_tiny, out_vae) = (tmp.path().join("tiny"), tmp.path().join("vae"));
    for (out, decoder) in [(&out_tiny, tiny.as_str()), (&out_vae, "vae")] {
        let o = run(out, decoder);
        assert!(o.status.success(), "{decoder}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let id = &orchestrate::jobs::prompts::read_prompts(&prompts).unwrap()[0].id;
    let img = |out: &Path, dir: &str| image::open(out.join(format!("{dir}/{id}_0.png"))).unwrap().to_rgb8();
    assert_ne!(img(&out_tiny, "guided"), img(&out_tiny, "unguided"), "the tiny decoder's gradient changed nothing");
    assert_ne!(img(&out_tiny, "guided"), img(&out_vae, "guided"), "the tiny decoder was not used");
    // The final images come from the full VAE: unguided ones are the same.
    assert_eq!(img(&out_tiny, "unguided"), img(&out_vae, "unguided"));

    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_tiny.join("settings.json")).unwrap()).unwrap();
    let recorded = settings["decoder"].as_str().unwrap();
    assert!(recorded.starts_with("tiny:") && recorded.ends_with("sd-tiny-taesd"), "{recorded}");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_vae.join("settings.json")).unwrap()).unwrap();
    assert!(settings.get("decoder").is_none(), "the default adds nothing to the settings");
    // Another decoder on the same folder is other settings.
    let o = run(&out_tiny, "vae");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("decoder"), "{err}");

    // A TAESD of another latent space (3 channels here) is refused, naming
    // the option, before anything is written.
    let bad = tmp.path().join("taesd-3ch");
    common::copy_dir(&taesd, &bad);
    let config = bad.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["latent_channels"] = 3.into();
    std::fs::write(&config, v.to_string()).unwrap();
    let out_bad = tmp.path().join("bad");
    let o = run(&out_bad, &format!("tiny:{}", bad.display()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a 3-channel decoder was accepted");
    assert!(err.contains("guide.decoder") && err.contains("3 latent channels") && err.contains("4 latent channels"), "{err}");
    assert!(!out_bad.exists(), "a refused run wrote {}", out_bad.display());
    // So is a value that is neither `vae` nor `tiny:DIR`.
    let o = run(&out_bad, "taesd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--guide-decoder") && err.contains("tiny:DIR"), "{err}");
    assert!(!out_bad.exists());
}
