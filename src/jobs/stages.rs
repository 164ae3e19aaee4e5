//! Overlapping the GPU stages with the CPU stage: the producer (generation,
//! scoring) runs on the calling thread, which owns the models; its results go
//! through a bounded channel to a CPU thread (PNG encoding, masks, manifest
//! lines), so the GPU never waits for encoding and memory stays bounded.
use crate::error::{Error, Result};
use std::sync::mpsc::sync_channel;

/// Runs `produce` on each work unit in order on this thread, and `consume` on
/// each product, in the same order, on one CPU thread (which may use rayon
/// inside). At most `depth` products wait between the two. The first error of
/// either side stops both and is returned.
pub fn overlap<W, P, Fp, Fc>(work: Vec<W>, depth: usize, mut produce: Fp, mut consume: Fc) -> Result<()>
where
    P: Send,
    Fp: FnMut(W) -> Result<P>,
    Fc: FnMut(P) -> Result<()> + Send,
{
    let (tx, rx) = sync_channel::<P>(depth.max(1));
    std::thread::scope(|scope| {
        let consumer = scope.spawn(move || -> Result<()> {
            for product in rx {
                consume(product)?;
            }
            Ok(())
        });
        let mut produced = Ok(());
        for unit in work {
            match produce(unit) {
                Ok(p) => {
                    if tx.send(p).is_err() {
                        // The consumer stopped on an error; it is reported below.
                        break;
                    }
                }
                Err(e) => {
                    produced = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let consumed = consumer.join().unwrap_or_else(|payload| {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Error::Invalid(format!("the CPU stage (image encoding, manifest) failed unexpectedly: {what}")))
        });
        // A consumer error is the root cause when both failed.
        consumed.and(produced)
    })
}

/// On CPU, gives libtorch one thread fewer than the machine has cores.
/// libtorch's OpenMP workers spin between kernels, and a CPU-stage thread
/// competing with them for the last core stalls every parallel region
/// (measured in `filter`: 4x slower on 2 cores). Idempotent: the count comes
/// from the core count, not from the current setting, so jobs run one after
/// another in a recipe do not keep lowering it.
///
/// A process given a share of the cores ([`set_cpu_cores`]: a CPU worker
/// of `run --devices cpu,cpu`) counts only those, and takes at least one thread.
pub fn leave_a_core_for_the_cpu_stage(device: tch::Device) {
    if device != tch::Device::Cpu {
        return;
    }
    let share = CPU_CORES.load(std::sync::atomic::Ordering::Relaxed);
    if share > 0 {
        tch::set_num_threads(share.saturating_sub(1).max(1) as i32);
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cores > 1 {
        tch::set_num_threads((cores - 1) as i32);
    }
}

/// The cores this process may use on the CPU (0: all the machine's).
static CPU_CORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Gives this process `cores` of the machine's cores for libtorch on the CPU
/// (the rest belong to other workers of the same run).
pub fn set_cpu_cores(cores: usize) {
    CPU_CORES.store(cores, std::sync::atomic::Ordering::Relaxed);
}
