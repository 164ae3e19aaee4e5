//! Training RAHF: the tiny config learns a planted signal on synthetic data
//! (its validation metrics beat a constant predictor), and a resumed run
//! continues exactly.
use orchestrate::rahf::augment::AugmentConfig;
use orchestrate::rahf::train::loss::LossWeights;
use orchestrate::rahf::train::optim::AdamWConfig;
use orchestrate::rahf::train::{train, Hyperparameters, TrainOptions};
use orchestrate::richhf::dataset::InMemory;
use orchestrate::richhf::synthetic;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rahf")
}

/// The tiny multi-head RAHF (48 px images, 48 px heatmaps), imported from the fixture.
fn init_folder(dir: &Path) -> PathBuf {
    init_variant(dir, "multi_head")
}

fn init_variant(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(format!("init-{name}"));
    let f = fixtures();
    orchestrate::rahf::import::import(
        &f.join(format!("{name}.pt")),
        f.join("vit").to_str().unwrap(),
        f.join("t5").to_str().unwrap(),
        &out,
    )
    .expect("import the tiny RAHF");
    out
}

fn hyper(steps: u64) -> Hyperparameters {
    Hyperparameters {
        steps,
        batch_size: 16,
        micro_batch_size: 8,
        learning_rate: 3e-3,
        warmup_steps: 10,
        adamw: AdamWConfig { weight_decay: 0.0, ..Default::default() },
        augment: AugmentConfig::none(),
        seed: 5,
        precision: "fp32".into(),
        // The heatmap and score MSEs are small next to the cross-entropy; weigh them up.
        loss: LossWeights { heatmap: 20.0, score: 5.0, keyword: 1.0 },
        ..Hyperparameters::paper()
    }
}

fn options(init: &Path, out: &Path, hyper: Hyperparameters) -> TrainOptions {
    TrainOptions {
        init: init.to_path_buf(),
        out: out.to_path_buf(),
        resume: false,
        hyper,
        eval_every: 0,
        checkpoint_every: 0,
        keep_checkpoints: 2,
        device: tch::Device::Cpu,
        progress: false,
        data_description: "synthetic".into(),
    }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn learns_the_planted_signal() {
    tch::set_num_threads(2);
    let tmp = tempfile::tempdir().unwrap();
    let init = init_folder(tmp.path());
    let train_set = InMemory { name: "synthetic train".into(), samples: synthetic::samples(1024, 48, 48, 1) };
    let dev_set = InMemory { name: "synthetic dev".into(), samples: synthetic::samples(48, 48, 48, 2) };
    let out = tmp.path().join("run");
    let mut opts = options(&init, &out, hyper(300));
    opts.eval_every = 100;
    let summary = train(&opts, &train_set, Some(&dev_set)).expect("train");
    let v = summary.last_validation.expect("validated at the end");
    assert_eq!(v.samples, 48);

    // The constant predictor: the training set's mean scores and mean heatmaps.
    let n = train_set.samples.len() as f64;
    let mean_score: Vec<f64> = (0..4).map(|k| mean(train_set.samples.iter().map(|s| s.scores[k] as f64))).collect();
    let px = 48 * 48;
    let mean_map: Vec<Vec<f64>> = (0..2)
        .map(|m| (0..px).map(|p| train_set.samples.iter().map(|s| s.heatmaps[m].data[p] as f64).sum::<f64>() / n).collect())
        .collect();
    let const_score = mean(dev_set.samples.iter().map(|s| mean((0..4).map(|k| (s.scores[k] as f64 - mean_score[k]).powi(2)))));
    let const_heatmap = mean(dev_set.samples.iter().map(|s| {
        mean((0..2).flat_map(|m| {
            let mm = &mean_map[m];
            (0..px).map(move |p| (s.heatmaps[m].data[p] as f64 - mm[p]).powi(2))
        }))
    }));
    eprintln!("dev after training: {}", v.one_line());
    eprintln!("constant predictor: score MSE {const_score:.5}, heatmap MSE {const_heatmap:.5}");
    // Plausibility and aesthetics are learned in every run; alignment (matching the
    // blotch's colour to the prompt's word) only in some, as rounding steers it, so
    // the bound on the mean of the four MSEs leaves room for it.
    assert!(v.score < 0.85 * const_score, "score MSE {} vs constant {const_score}", v.score);
    assert!(v.heatmap < 0.85 * const_heatmap, "heatmap MSE {} vs constant {const_heatmap}", v.heatmap);
    let plausibility = v.plcc[0].expect("defined");
    assert!(plausibility > 0.5, "plausibility PLCC {plausibility}");

    // The paper's metrics on dev (what `rahf eval` reports), from the last validation.
    let report = &v.metrics;
    eprintln!("{}", report.to_markdown());
    let srcc = report.scores.plausibility.srcc.unwrap();
    assert!(srcc > 0.5, "plausibility SRCC {srcc}");
    // A constant "nothing is misaligned" predictor has recall 0.
    let f1 = report.keywords.f1.unwrap_or(0.0);
    assert!(f1 > 0.5, "keyword F1 {f1}");

    // The run folder has what users need: a loadable model, the log, the plot.
    let fm = orchestrate::rahf::FeedbackModel::load(&summary.final_model, tch::Device::Cpu, tch::Kind::Float).unwrap();
    assert_eq!(fm.predict(&[dev_set.samples[0].image.clone()], &[dev_set.samples[0].prompt.clone()]).unwrap().len(), 1);
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"lr\"")).count(), 300);
    assert_eq!(log.lines().filter(|l| l.contains("\"dev\"")).count(), 3);
    assert!(std::fs::read_to_string(out.join("curves.html")).unwrap().contains("<svg"));
}

#[test]
fn resume_continues_exactly() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let init = init_folder(tmp.path());
    let data = InMemory { name: "synthetic".into(), samples: synthetic::samples(24, 48, 48, 9) };
    let mut h = hyper(4);
    h.augment = AugmentConfig::default();
    h.augment.crop_prob = 0.5;
    h.augment.color_prob = 0.5;
    h.batch_size = 6;
    h.micro_batch_size = 3;

    let straight = tmp.path().join("straight");
    train(&options(&init, &straight, h.clone()), &data, None).unwrap();

    let resumed = tmp.path().join("resumed");
    let mut first = h.clone();
    first.steps = 2;
    let mut o = options(&init, &resumed, first);
    o.checkpoint_every = 1;
    train(&o, &data, None).unwrap();
    // A second start without --resume must refuse to clobber the run.
    let err = train(&options(&init, &resumed, h.clone()), &data, None).err().unwrap().to_string();
    assert!(err.contains("--resume"), "{err}");
    // Different hyperparameters on resume are refused, naming the field.
    let mut other = h.clone();
    other.learning_rate = 1.0;
    let mut o = options(&init, &resumed, other);
    o.resume = true;
    let err = train(&o, &data, None).err().unwrap().to_string();
    assert!(err.contains("learning_rate"), "{err}");

    let mut o = options(&init, &resumed, h.clone());
    o.resume = true;
    let s = train(&o, &data, None).unwrap();
    assert_eq!(s.started_at_step, 2);
    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from an uninterrupted run");
    let log = std::fs::read_to_string(resumed.join("log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    // Only the newest 2 checkpoints are kept.
    let kept = std::fs::read_dir(resumed.join("checkpoints")).unwrap().count();
    assert_eq!(kept, 2);
}

/// bf16 (the default on CUDA) runs forward and backward in bfloat16 on copies of the
/// fp32 master weights; the updates land on the fp32 weights. Checked here on the CPU.
#[test]
fn bf16_steps_update_fp32_master_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let init = init_folder(tmp.path());
    let data = InMemory { name: "synthetic".into(), samples: synthetic::samples(8, 48, 48, 4) };
    let mut h = hyper(2);
    h.precision = "bf16".into();
    h.batch_size = 4;
    h.micro_batch_size = 2;
    let out = tmp.path().join("run");
    let s = train(&options(&init, &out, h), &data, None).unwrap();
    assert!(s.last_loss.unwrap().is_finite());
    let before: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(init.join("model.safetensors")).unwrap().into_iter().collect();
    let after = tch::Tensor::read_safetensors(s.final_model.join("model.safetensors")).unwrap();
    let mut changed = 0;
    for (name, t) in &after {
        assert_eq!(t.kind(), tch::Kind::Float, "{name} saved as {:?}", t.kind());
        if t.to_kind(tch::Kind::Double).ne_tensor(&before[name].to_kind(tch::Kind::Double)).any().int64_value(&[]) != 0 {
            changed += 1;
        }
    }
    assert!(changed * 10 > after.len() * 9, "only {changed} of {} tensors were updated", after.len());
    let train_json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("train.json")).unwrap()).unwrap();
    assert_eq!(train_json["hyperparameters"]["precision"], "bf16");
}

/// The augmented-prompt variant trains through its six task prompts (one shared
/// score head, one shared heatmap head), and its loss goes down on a fixed batch.
#[test]
fn augmented_variant_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let init = init_variant(tmp.path(), "augmented");
    let data = InMemory { name: "synthetic".into(), samples: synthetic::samples(8, 48, 48, 6) };
    let mut h = hyper(12);
    h.batch_size = 8;
    h.micro_batch_size = 4;
    let out = tmp.path().join("run");
    train(&options(&init, &out, h), &data, None).unwrap();
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(losses[11] < 0.5 * losses[0], "loss {losses:?}");
    let cfg = orchestrate::rahf::RahfConfig::load(&out.join("final")).unwrap();
    assert_eq!(cfg.variant, orchestrate::rahf::Variant::Augmented);
}

/// Training pads prompts of mixed lengths and masks the padding: each item's loss
/// in the batch is the loss it has alone (unpadded, as inference runs it).
#[test]
fn padded_batch_loss_equals_per_item_losses() {
    use orchestrate::rahf::train::batch::collate;
    use orchestrate::rahf::train::loss::batch_loss;
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["multi_head", "augmented"] {
        let init = init_variant(tmp.path(), name);
        let fm = orchestrate::rahf::FeedbackModel::load(&init, tch::Device::Cpu, tch::Kind::Float).unwrap();
        let mut samples = synthetic::samples(4, 48, 48, 3);
        let prompts = ["a red cat sitting on the grass under the tree", "a dog", "a big blue car with a hat"];
        for (s, p) in samples.iter_mut().zip(prompts) {
            s.prompt = p.to_string();
            s.misaligned = (0..p.split(' ').count()).map(|i| i % 3 == 1).collect();
        }
        let w = LossWeights { heatmap: 3.0, score: 2.0, keyword: 1.0 };
        let loss = |items: &[orchestrate::richhf::Sample]| {
            let batch = collate(items, &fm.tokenizer, fm.config(), tch::Device::Cpu).unwrap();
            let p = batch_loss(&fm.model, &batch, &w, 4.0).unwrap();
            (p.total.double_value(&[]), p.heatmap_sum, p.score_sum, p.keyword_sum)
        };
        let together = loss(&samples);
        let alone = samples.iter().map(|s| loss(std::slice::from_ref(s))).fold((0.0, 0.0, 0.0, 0.0), |a, b| {
            (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3)
        });
        for (what, t, a) in [
            ("total", together.0, alone.0),
            ("heatmap", together.1, alone.1),
            ("score", together.2, alone.2),
            ("keyword", together.3, alone.3),
        ] {
            assert!((t - a).abs() <= 1e-5 * a.abs().max(1e-3), "{name} {what}: batch {t} vs items alone {a}");
        }
    }
}
