//! The jobs users run (paper §5): `filter`, `inpaint`, `guide`, each from CLI
//! flags or from a YAML recipe, on the resumable runner.
//!
//! Every job module exposes the same shape, so the recipe and the CLI can drive
//! any of them:
//!
//! * `XOptions`: the job's own settings, `serde::Deserialize` with
//!   `deny_unknown_fields` and defaults, so a recipe section parses straight
//!   into it and the CLI fills the same struct from flags;
//! * `XOptions::validate(&self) -> Result<()>`: every range check that needs
//!   no model (thresholds in [0,1], sizes multiples of 8, files exist), used by
//!   `run --dry-run`;
//! * `run(opts: &XOptions, common: &CommonOptions, ctx: &RunContext) -> Result<JobSummary>`.
pub mod common;
pub mod devices;
pub mod guide;
pub mod filter;
pub mod finetune;
pub mod inpaint;
pub mod manifest;
pub mod merge;
pub mod prompts;
pub mod runner;
pub mod shard;
pub mod stages;

pub use common::{CommonOptions, JobSummary, ModelOptions, RunContext, SamplingOptions, Shard};
