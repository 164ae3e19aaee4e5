//! `orchestrate env`: what this binary sees on this machine.
use serde::Serialize;

#[derive(Serialize)]
pub struct EnvReport {
    pub orchestrate_version: String,
    pub libtorch_version: String,
    pub libtorch_lib_dir: String,
    pub cuda_available: bool,
    pub cuda_reason: String,
    pub cudnn_available: bool,
    pub devices: Vec<DeviceReport>,
    pub cpu_threads: i32,
}

#[derive(Serialize)]
pub struct DeviceReport {
    pub name: String,
    pub fp32: bool,
    pub fp16: bool,
    pub bf16: bool,
}

/// The libtorch version compiled in (torch-sys checks it against 2.11.0).
pub const LIBTORCH_VERSION: &str = "2.11.0";

/// Why CUDA is not visible, as precisely as we can tell from here.
pub fn cuda_absence_reason() -> String {
    if tch::Cuda::is_available() {
        return "CUDA is available".into();
    }
    let linked = std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.contains("libtorch_cuda.so"))
        .unwrap_or(false);
    if !linked {
        return "libtorch_cuda.so is not loaded: this binary was linked against a CPU-only libtorch".into();
    }
    let driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
    if !driver {
        return "no NVIDIA driver on this machine (/proc/driver/nvidia/version absent)".into();
    }
    if std::env::var("CUDA_VISIBLE_DEVICES").map(|v| v.trim().is_empty() || v == "-1").unwrap_or(false) {
        return "CUDA_VISIBLE_DEVICES hides every device".into();
    }
    "libtorch_cuda.so is loaded and a driver is present, but CUDA reports no device (driver too old for CUDA 13?)".into()
}

fn probe(device: tch::Device, kind: tch::Kind) -> bool {
    std::panic::catch_unwind(|| {
        let a = tch::Tensor::ones([8, 8], (kind, device));
        let _ = a.f_matmul(&a).map(|t| t.to_kind(tch::Kind::Float).sum(tch::Kind::Float).double_value(&[]));
        a.f_matmul(&a).is_ok()
    })
    .unwrap_or(false)
}

pub fn collect() -> EnvReport {
    let cuda_available = tch::Cuda::is_available();
    let mut devices = vec![DeviceReport {
        name: "cpu".into(),
        fp32: true,
        // What the jobs accept, not what a kernel happens to run: `--dtype`
        // refuses half precision on the CPU (slow, and not what diffusers does).
        fp16: false,
        bf16: false,
    }];
    for i in 0..tch::Cuda::device_count() as usize {
        let d = tch::Device::Cuda(i);
        devices.push(DeviceReport {
            name: format!("cuda:{i}"),
            fp32: probe(d, tch::Kind::Float),
            fp16: probe(d, tch::Kind::Half),
            bf16: probe(d, tch::Kind::BFloat16),
        });
    }
    let lib_dir = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().last())
                .find(|p| p.ends_with("libtorch_cpu.so"))
                .map(|p| p.trim_end_matches("/libtorch_cpu.so").to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    EnvReport {
        orchestrate_version: env!("CARGO_PKG_VERSION").into(),
        libtorch_version: LIBTORCH_VERSION.into(),
        libtorch_lib_dir: lib_dir,
        cuda_available,
        cuda_reason: cuda_absence_reason(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        devices,
        cpu_threads: tch::get_num_threads(),
    }
}
