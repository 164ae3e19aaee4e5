//! Seeded noise. tch has no Generator objects, only libtorch's global CPU
//! generator, so reproducing diffusers' per-image `torch.Generator().manual_seed(s)`
//! means reseeding that global one and drawing in diffusers' order. Two
//! samplers in one process (parallel tests, a server) must not interleave
//! their draws: every reseed-and-draw sequence holds this lock.
use std::sync::{Mutex, MutexGuard};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// Holds the global generator for one reseed-and-draw sequence.
pub fn lock_generator() -> MutexGuard<'static, ()> {
    // A panic while drawing leaves nothing half-done that matters: the next
    // holder reseeds anyway.
    GLOBAL_GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
