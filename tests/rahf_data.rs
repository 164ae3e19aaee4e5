//! RichHF-18K splits joined with their images: what cannot be joined or read is
//! reported by record, and the `rahf synth | train | eval` commands run end to end.
use orchestrate::richhf::dataset::{open_images_for_splits, RichHfSplit, SampleSource};
use orchestrate::richhf::record::{encode_record, RichHfRecord};
use orchestrate::richhf::sample::Heatmap;
use orchestrate::richhf::synthetic::write_dataset;
use orchestrate::richhf::tfrecord::{OnError, TfRecordWriter};
use std::path::Path;
use std::process::Command;

fn record(index: u64, filename: &str, labels: Vec<u8>) -> RichHfRecord {
    RichHfRecord {
        index,
        filename: filename.into(),
        scores: [0.5, 0.25, 0.75, 1.0],
        heatmaps: [Heatmap::zeros(512, 512), Heatmap::zeros(512, 512)],
        labels,
    }
}

/// A data set whose test split holds: a joinable record, one whose image is not in
/// the Pick-a-Pic source, one with too few labels, and one with a heatmap of another size.
fn awkward_dataset(dir: &Path) {
    write_dataset(dir, &[("train", 4), ("dev", 2)], 32, 64, 1).unwrap();
    let jsonl = std::fs::read_to_string(dir.join("prompts.jsonl")).unwrap();
    image::RgbImage::new(8, 8).save(dir.join("images/extra.png")).unwrap();
    std::fs::write(
        dir.join("prompts.jsonl"),
        format!("{jsonl}{}\n", serde_json::json!({"filename": "images/extra.png", "prompt": "a red cat"})),
    )
    .unwrap();
    let mut w = TfRecordWriter::create(&dir.join("test.tfrecord")).unwrap();
    w.write_record(&encode_record(&record(0, "test/extra.png", vec![1, 0, 1]))).unwrap();
    w.write_record(&encode_record(&record(1, "test/not-in-pickapic.png", vec![1, 1, 1]))).unwrap();
    w.write_record(&encode_record(&record(2, "test/extra.png", vec![1, 0]))).unwrap();
    let mut small = record(3, "test/extra.png", vec![1, 1, 1]);
    small.heatmaps[0] = Heatmap { height: 2, width: 2, data: vec![0.0, 1.0, 1.0, 0.0] };
    w.write_record(&encode_record(&small)).unwrap();
    w.finish().unwrap();
}

#[test]
fn join_reports_what_it_cannot_use() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    awkward_dataset(dir);
    let images = open_images_for_splits(dir, None, None, &["test"], OnError::Stop).unwrap();
    let (split, report) = RichHfSplit::open(dir, "test", images, OnError::Stop).unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(report.joined, 3);
    assert_eq!(report.unjoined, vec![(1, "test/not-in-pickapic.png".to_string())]);
    assert_eq!(report.label_mismatch.len(), 1);
    assert!(report.label_mismatch[0].starts_with("record 2 "), "{:?}", report.label_mismatch);
    assert_eq!(split.len(), 3);
    let s = split.get(0).unwrap();
    assert_eq!((s.prompt.as_str(), s.misaligned.clone()), ("a red cat", vec![false, true, false]));
    // Record 3's 2x2 map is resized to the release's 512x512.
    let s = split.get(2).unwrap();
    assert_eq!((s.heatmaps[0].height, s.heatmaps[0].width), (512, 512));
    assert!(s.heatmaps[0].data.iter().any(|&v| v > 0.0));
}

#[test]
fn damaged_records_stop_or_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_dataset(dir, &[("test", 3)], 32, 64, 2).unwrap();
    let path = dir.join("test.tfrecord");
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip a byte inside the second record's data: its data CRC no longer matches.
    let first_len = u64::from_le_bytes(bytes[0..8].try_into().unwrap()) as usize;
    let second = 12 + first_len + 4;
    bytes[second + 12 + 10] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = open_images_for_splits(dir, None, None, &["test"], OnError::Stop).err().unwrap().to_string();
    assert!(err.contains("test.tfrecord record 1") && err.contains("CRC"), "{err}");
    let images = open_images_for_splits(dir, None, None, &["test"], OnError::Skip).unwrap();
    let (split, report) = RichHfSplit::open(dir, "test", images, OnError::Skip).unwrap();
    assert_eq!(split.len(), 2);
    assert_eq!(report.damaged.len(), 1, "{:?}", report.damaged);
    assert!(report.damaged[0].contains("record 1"), "{:?}", report.damaged);
}

#[test]
fn missing_split_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path(), &[("train", 2)], 32, 64, 1).unwrap();
    let err = open_images_for_splits(tmp.path(), None, None, &["test"], OnError::Stop).err().unwrap().to_string();
    assert!(err.contains("test.tfrecord"), "{err}");
}

fn orchestrate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrate")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn synth_train_resume_eval_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(orchestrate(&[
        "rahf", "import", "--checkpoint", &s(&f.join("multi_head.pt")), "--vit", &s(&f.join("vit")), "--t5", &s(&f.join("t5")),
        "--out", &t("init"),
    ]));
    ok(orchestrate(&["rahf", "synth", "--out", &t("data"), "--train", "24", "--dev", "8", "--test", "8", "--heatmap-size", "64"]));
    let train = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "rahf", "train", "--init", &t("init"), "--data", &t("data"), "--out", &t("run"), "--steps", steps,
            "--batch-size", "4", "--micro-batch-size", "2", "--lr", "0.003", "--warmup", "2", "--eval-every", "2",
            "--checkpoint-every", "2", "--device", "cpu", "--json",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        orchestrate(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let summary: serde_json::Value = serde_json::from_str(&ok(train("2", &[]))).unwrap();
    assert_eq!(summary["steps"], 2);
    assert!(summary["last_validation"]["samples"] == 8);
    let again = train("4", &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let summary: serde_json::Value = serde_json::from_str(&ok(train("4", &["--resume"]))).unwrap();
    assert_eq!((summary["started_at_step"].as_u64(), summary["steps"].as_u64()), (Some(2), Some(4)));

    let md = ok(orchestrate(&[
        "rahf", "eval", "--rahf", &t("run/final"), "--data", &t("data"), "--split", "test", "--out", &t("eval"), "--device", "cpu",
    ]));
    assert!(md.contains("Table 4") && md.contains("orchestrate (this checkpoint, multi-head)"), "{md}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(t("eval") + "/eval.json").unwrap()).unwrap();
    assert_eq!(report["samples"], 8);
    let preds = std::fs::read_to_string(t("eval") + "/predictions.jsonl").unwrap();
    assert_eq!(preds.lines().count(), 8);

    let bad = orchestrate(&["rahf", "eval", "--rahf", &t("run/final"), "--data", &t("data"), "--on-error", "maybe"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--on-error"));
}
