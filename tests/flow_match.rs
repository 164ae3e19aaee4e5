//! The flow-match scheduler (SD3, FLUX) against diffusers 0.42.1's own
//! `FlowMatchEulerDiscreteScheduler`: schedules for static shift, FLUX's
//! dynamic shift with the pipeline's custom sigmas, shift_terminal, Karras,
//! exponential and linear time shift; steps and `scale_noise` in float32 and
//! float16; the img2img start index. References from
//! tests/fixtures/schedulers/make_flow_fixtures.py.
use orchestrate::diffusion::schedulers::{self, flow_match, SchedulerConfig, SchedulerKind};
use serde_json::Value;
use std::path::Path;
use tch::{Kind, Tensor};

fn fixtures() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers/flow_match.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn config(v: &Value) -> SchedulerConfig {
    let mut c = v.clone();
    c["_class_name"] = "FlowMatchEulerDiscreteScheduler".into();
    SchedulerConfig::from_json_str(&c.to_string(), Path::new("scheduler_config.json")).unwrap()
}

/// Distance in float32 units in the last place.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn schedules_match_diffusers() {
    let fx = fixtures();
    let mut exact = 0;
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg = config(&case["config"]);
        let mu = case["mu"].as_f64();
        let s = match case.get("steps") {
            Some(steps) => schedulers::build_flow(&cfg, steps.as_u64().unwrap() as usize, mu),
            None => schedulers::build_flow_with_sigmas(&cfg, &floats(&case["sigmas_in"]), mu),
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_sigmas = floats(&case["sigmas"]);
        let want_t = floats(&case["timesteps"]);
        let got_sigmas = s.sigmas().unwrap();
        assert_eq!(got_sigmas.len(), want_sigmas.len(), "{name}: sigma count");
        assert_eq!(s.timesteps().len(), want_t.len(), "{name}: timestep count");
        let mut worst = 0;
        for (i, (&g, &w)) in got_sigmas.iter().zip(&want_sigmas).enumerate() {
            let d = ulps(g, w as f32);
            assert!(d <= 1, "{name}: sigma {i} {g} vs diffusers {w}");
            worst = worst.max(d);
        }
        for (i, (&g, &w)) in s.timesteps().iter().zip(&want_t).enumerate() {
            let d = ulps(g as f32, w as f32);
            assert!(d <= 1, "{name}: timestep {i} {g} vs diffusers {w}");
            worst = worst.max(d);
        }
        exact += (worst == 0) as usize;
        eprintln!("{name}: worst {worst} ulp");
    }
    // Only numpy's vectorised exp (exponential sigmas) may round differently.
    assert!(exact + 1 >= fx["cases"].as_array().unwrap().len(), "{exact} cases bit-identical");
}

fn tensor(v: &Value, kind: Kind) -> Tensor {
    let f: Vec<f32> = floats(v).into_iter().map(|x| x as f32).collect();
    Tensor::from_slice(&f).view([1, 4, 4, 4]).to_kind(kind)
}

#[test]
fn steps_and_scale_noise_match_diffusers_bit_for_bit() {
    let fx = fixtures();
    let flux = &fx["cases"].as_array().unwrap().iter().find(|c| c["name"] == "flux_dev_256_4").unwrap()["config"];
    for case in fx["steps"].as_array().unwrap() {
        let kind = if case["dtype"] == "float16" { Kind::Half } else { Kind::Float };
        let cfg = config(flux);
        let mu = case["mu"].as_f64();
        let mut s = schedulers::build_flow_with_sigmas(&cfg, &floats(&case["sigmas"]), mu).unwrap();
        assert_eq!(s.kind(), SchedulerKind::FlowMatchEuler);
        assert!(!s.needs_noise());
        let x0 = tensor(&case["x"], kind);
        let mut x = x0.shallow_clone();
        for (i, v) in case["v"].as_array().unwrap().iter().enumerate() {
            let v = tensor(v, kind);
            let before = x.shallow_clone();
            x = s.step(&v, i, &x, None);
            assert_eq!(x.kind(), kind);
            // x̂0 = x − σ·v lies on the line through x and the step's result.
            let x0_hat = s.pred_original_sample(&v, i, &before).to_kind(Kind::Float);
            let sigma = s.sigmas().unwrap()[i] as f64;
            let expect = before.to_kind(Kind::Float) - v.to_kind(Kind::Float) * sigma;
            assert!((x0_hat - expect).abs().max().double_value(&[]) < 1e-2, "x̂0 at step {i}");
        }
        let want = tensor(&case["out"], kind);
        assert!(x.equal(&want), "{kind:?}: sampled latents differ from diffusers by {}",
            (x.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs().max().double_value(&[]));
        let noised = s.add_noise(&x0, &tensor(&case["noise"], kind), 2);
        assert!(noised.equal(&tensor(&case["noised_at_2"], kind)), "{kind:?}: scale_noise");
        // The result moved: the check above is not comparing a constant.
        assert!(!x.equal(&x0));
    }
}

#[test]
fn img2img_start_index_is_the_flow_pipelines_rule() {
    for case in fixtures()["strength"].as_array().unwrap() {
        let (n, st) = (case["steps"].as_u64().unwrap() as usize, case["strength"].as_f64().unwrap());
        assert_eq!(flow_match::start_index_for_strength(n, st), case["start"].as_u64().unwrap() as usize, "{n} steps at {st}");
    }
    // Not the UNet pipelines' floor rule: 10 steps at 0.75 start at 2 here, 3 there.
    assert_eq!(flow_match::start_index_for_strength(10, 0.75), 2);
    assert_eq!(schedulers::start_index_for_strength(10, 0.75), 3);
}

#[test]
fn mu_is_diffusers_calculate_shift() {
    let fx = fixtures();
    for case in fx["cases"].as_array().unwrap() {
        if let (Some(seq), Some(mu)) = (case["seq"].as_i64(), case["mu"].as_f64()) {
            let cfg = config(&case["config"]);
            assert_eq!(flow_match::mu_for(&cfg, seq), mu, "{}", case["name"]);
        }
    }
}

#[test]
fn bad_flow_configs_name_the_field() {
    let bad = [
        (r#"{"shift": -1.0}"#, "shift"),
        (r#"{"time_shift_type": "cubic"}"#, "time_shift_type"),
        (r#"{"stochastic_sampling": true}"#, "stochastic_sampling"),
        (r#"{"invert_sigmas": true}"#, "invert_sigmas"),
        (r#"{"use_beta_sigmas": true}"#, "use_beta_sigmas"),
        (r#"{"use_karras_sigmas": true, "use_exponential_sigmas": true}"#, "use_exponential_sigmas"),
        (r#"{"shift_terminal": 1.5}"#, "shift_terminal"),
        (r#"{"base_image_seq_len": 4096, "max_image_seq_len": 256}"#, "max_image_seq_len"),
    ];
    for (json, field) in bad {
        let cfg = SchedulerConfig::from_json_str(json, Path::new("flux/scheduler/scheduler_config.json")).unwrap();
        let err = schedulers::build_flow(&cfg, 4, None).err().unwrap_or_else(|| panic!("{json} accepted")).to_string();
        assert!(err.contains("scheduler_config.json") && err.contains(field), "{json}: {err}");
    }
    // Dynamic shifting without the image's mu is the pipeline's bug, said plainly.
    let cfg = SchedulerConfig::from_json_str(r#"{"use_dynamic_shifting": true}"#, Path::new("s.json")).unwrap();
    assert!(schedulers::build_flow(&cfg, 4, None).err().unwrap().to_string().contains("mu"));
    // A UNet pipeline cannot be sampled with the flow-match scheduler.
    let err = schedulers::build(SchedulerKind::FlowMatchEuler, &cfg, 4).err().unwrap().to_string();
    assert!(err.contains("flow-matching"), "{err}");
}
