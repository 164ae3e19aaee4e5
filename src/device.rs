//! Where tensors live and in which precision.
use crate::error::{Error, Result};
use tch::{Device, Kind};

/// `--device auto|cpu|cuda|cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "auto" => {
            if tch::Cuda::is_available() {
                cuda_device(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda_device(i),
            _ => Err(Error::Device(format!("--device `{s}`: expected auto, cpu, cuda or cuda:N"))),
        },
    }
}

fn cuda_device(index: usize) -> Result<Device> {
    let count = tch::Cuda::device_count() as usize;
    if count == 0 {
        return Err(Error::Device(format!(
            "--device cuda:{index}: no CUDA device is visible ({})",
            crate::env_report::cuda_absence_reason()
        )));
    }
    if index >= count {
        return Err(Error::Device(format!("--device cuda:{index}: only {count} CUDA device(s) visible")));
    }
    let device = Device::Cuda(index);
    crate::perf::configure_device(device);
    Ok(device)
}

/// [`parse_dtype`] for a generator: `auto` on CUDA is `cuda_auto()` (the
/// family's half precision, [`crate::diffusion::generator::cuda_auto_dtype`]),
/// asked only then.
pub fn parse_generator_dtype(spec: &str, device: Device, cuda_auto: impl FnOnce() -> Result<Kind>) -> Result<Kind> {
    if spec == "auto" && device.is_cuda() {
        return cuda_auto();
    }
    parse_dtype(spec, device)
}

/// `--dtype auto|fp32|fp16|bf16`. Auto is fp32 on CPU (half precision there is
/// slow and not what diffusers does) and fp16 on CUDA; bf16 is allowed on CPU.
pub fn parse_dtype(spec: &str, device: Device) -> Result<Kind> {
    let kind = match spec {
        "auto" => {
            if device.is_cuda() {
                Kind::Half
            } else {
                Kind::Float
            }
        }
        "fp32" | "float32" => Kind::Float,
        "fp16" | "float16" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        s => return Err(Error::Device(format!("--dtype `{s}`: expected auto, fp32, fp16 or bf16"))),
    };
    // bfloat16 runs on the CPU (oneDNN): slow on most CPUs, but it is how a
    // model's bf16 memory is measured without a GPU. float16 CPU kernels are
    // incomplete in libtorch, so it stays CUDA-only.
    if !device.is_cuda() && kind == Kind::Half {
        return Err(Error::Device(format!(
            "--dtype {spec}: float16 is only supported on CUDA; use fp32 (or bf16) on CPU"
        )));
    }
    Ok(kind)
}
