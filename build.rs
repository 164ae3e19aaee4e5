//! Link flags that torch-sys does not set for us.
//!
//! * An rpath to libtorch's `lib/`, so the binary (and test binaries) run
//!   without `LD_LIBRARY_PATH`.
//! * `libtorch_cuda.so` linked with `--no-as-needed`: nothing in our code
//!   references its symbols directly (CUDA kernels register themselves from
//!   static initialisers), so `--as-needed` would drop it and the binary would
//!   never see a GPU.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/setup.sh first");
        return;
    };
    // Resolve the .libtorch symlink so the rpath names the real, per-machine
    // location under ~/.cache/orchestrate rather than this checkout.
    let lib = PathBuf::from(&libtorch).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
