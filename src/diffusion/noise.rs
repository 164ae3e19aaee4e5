//! Seeded noise. tch has no Generator objects, only libtorch's global CPU
//! generator, so reproducing diffusers' per-image `torch.Generator().manual_seed(s)`
//! means reseeding that global one and drawing in diffusers' order. Two
//! samplers in one process (parallel tests, a server, a job's overlapping
//! stages) must not interleave their draws.
//!
//! So the only way this crate reseeds or draws is through a
//! [`GlobalGenerator`], which holds the process-wide lock for as long as it
//! lives: a caller cannot draw without it. Hold one for the whole
//! reseed-and-draw sequence of an image (or of a batch), e.g. with
//! [`with_seed`]. `tests/noise_threads.rs` checks that nothing else in `src/`
//! calls `tch::manual_seed` or `Tensor::randn` directly.
use std::sync::{Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// Exclusive use of libtorch's global CPU generator, from [`GlobalGenerator::lock`]
/// until dropped.
pub struct GlobalGenerator {
    _guard: MutexGuard<'static, ()>,
}

impl GlobalGenerator {
    /// Waits for the generator. A panic while another holder drew leaves
    /// nothing half-done that matters: every sequence starts with a reseed.
    pub fn lock() -> Self {
        let guard = GLOBAL_GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        GlobalGenerator { _guard: guard }
    }

    /// `torch.manual_seed(seed)`: restarts the stream.
    pub fn reseed(&mut self, seed: u64) {
        tch::manual_seed(seed as i64);
    }

    /// `torch.randn(shape, dtype=kind)` on the CPU, the next draw of the stream.
    pub fn randn(&mut self, shape: &[i64], kind: Kind) -> Tensor {
        Tensor::randn(shape, (kind, Device::Cpu))
    }

    /// `torch.randint(0, high, shape)` (int64) on the CPU, the next draw of
    /// the stream (training's timesteps).
    pub fn randint(&mut self, high: i64, shape: &[i64]) -> Tensor {
        Tensor::randint(high, shape, (Kind::Int64, Device::Cpu))
    }
}

/// Runs `draw` on the global generator freshly seeded with `seed`, holding it
/// throughout.
pub fn with_seed<R>(seed: u64, draw: impl FnOnce(&mut GlobalGenerator) -> R) -> R {
    let mut generator = GlobalGenerator::lock();
    generator.reseed(seed);
    draw(&mut generator)
}
