//! Which part of a job's items this process takes: `--shard i/n`, or
//! `--shard auto` from a batch scheduler's array variables. The one place
//! that reads those variables.
//!
//! # `--shard auto`
//! | scheduler | index | count |
//! |---|---|---|
//! | Slurm (`sbatch --array`) | `(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP` | `SLURM_ARRAY_TASK_COUNT` |
//! | Kubernetes Indexed Job | `JOB_COMPLETION_INDEX` | `ORCHESTRATE_SHARDS` (Kubernetes exports no count: set it to `completions`) |
//! | AWS Batch array job | `AWS_BATCH_JOB_ARRAY_INDEX` | `AWS_BATCH_JOB_ARRAY_SIZE`, else `ORCHESTRATE_SHARDS` |
//!
//! The Slurm rule: an array is one evenly spaced range of task ids
//! (`--array=0-7`, `1-8`, `0-14:2`, any `%` throttle), and shard `i` is the
//! `i`-th id of it, counting from `SLURM_ARRAY_TASK_MIN` (0 when Slurm does
//! not set it) in steps of `SLURM_ARRAY_TASK_STEP` (1 when unset). An array
//! with gaps (`--array=0,2,5`) is refused: its ids are no range, so no task
//! could know which shard is missing. When `SLURM_ARRAY_TASK_MAX` is set,
//! `(MAX - MIN) / STEP + 1` must equal the count.
//!
//! `ORCHESTRATE_SHARDS`, when set beside Slurm's or AWS's own count, must
//! agree with it. Variables of two schedulers at once are refused (which
//! one is meant?), as is `auto` with none: the error lists what was looked for.
//!
//! Without `--shard` a run is whole (shard 0/1), whatever the environment
//! holds; an array variable seen then is mentioned in a warning, since every
//! task of that array would then run everything.
use serde::Serialize;

/// `--shard i/n`: this process takes the items whose position % n == i.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

/// What is wrong with a `--shard` value or the scheduler environment behind `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shard `{spec}`: expected i/n with 0 <= i < n, or auto (from a Slurm, Kubernetes or AWS Batch array)")]
    Malformed { spec: String },
    #[error(
        "--shard auto: no array index in the environment; looked for SLURM_ARRAY_TASK_ID (Slurm sbatch --array), \
         JOB_COMPLETION_INDEX (Kubernetes Indexed Job) and AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch array job); \
         pass --shard i/n outside those"
    )]
    NotFound,
    #[error("--shard auto: {var}=`{value}` is not a whole number >= {min}")]
    NotANumber { var: &'static str, value: String, min: usize },
    #[error("--shard auto: {index_var} is set but {count_vars} is not: {hint}")]
    MissingCount { index_var: &'static str, count_vars: &'static str, hint: &'static str },
    #[error("--shard auto: both {a} and {b} are set: the environment of two schedulers; unset one, or pass --shard i/n")]
    TwoSchedulers { a: &'static str, b: &'static str },
    #[error("--shard auto: {a}={a_value} but {b}={b_value}: the shard counts disagree")]
    CountMismatch { a: &'static str, a_value: usize, b: &'static str, b_value: usize },
    #[error("--shard auto: {index_var}={index} is outside an array of {count} ({count_var}={count})")]
    OutOfRange { index_var: &'static str, index: usize, count_var: &'static str, count: usize },
    #[error(
        "--shard auto: the Slurm array is not one evenly spaced range ({detail}); submit it as --array=0-{last} \
         (or 1-{count}, or START-END:STEP) so that every task knows its shard"
    )]
    SlurmGaps { detail: String, count: usize, last: usize },
}

/// One environment variable, or `None` when unset or blank.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as a [`Lookup`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The variables that carry an array index, with their scheduler.
const INDEX_VARS: [(&str, &str); 3] = [
    ("SLURM_ARRAY_TASK_ID", "Slurm"),
    ("JOB_COMPLETION_INDEX", "Kubernetes"),
    ("AWS_BATCH_JOB_ARRAY_INDEX", "AWS Batch"),
];

impl Shard {
    /// `i/n` with 0 <= i < n.
    pub fn parse(spec: &str) -> Result<Shard, ShardError> {
        let bad = || ShardError::Malformed { spec: spec.to_string() };
        let (i, n) = spec.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// What `--shard` says: none (a whole run), `auto`, or `i/n`.
    pub fn resolve(spec: Option<&str>) -> Result<Shard, ShardError> {
        Shard::resolve_with(spec, &process_env)
    }

    /// [`Shard::resolve`] against any environment (tests give a map).
    pub fn resolve_with(spec: Option<&str>, env: Lookup) -> Result<Shard, ShardError> {
        match spec.map(str::trim) {
            None => {
                if let Some((var, who)) = INDEX_VARS.iter().find(|(v, _)| env(v).is_some()) {
                    tracing::warn!(
                        "{var} is set ({who} array) but no --shard was given: this process runs every item; \
                         pass --shard auto to take this task's share"
                    );
                }
                Ok(Shard::default())
            }
            Some("auto") => Shard::from_env(env),
            Some(s) => Shard::parse(s),
        }
    }

    /// The shard a scheduler's array environment names (see the module doc).
    pub fn from_env(env: Lookup) -> Result<Shard, ShardError> {
        let found: Vec<&str> = INDEX_VARS.iter().map(|(v, _)| *v).filter(|v| env(v).is_some()).collect();
        if found.len() > 1 {
            return Err(ShardError::TwoSchedulers { a: found[0], b: found[1] });
        }
        let number = |var: &'static str, min: usize| -> Result<Option<usize>, ShardError> {
            match env(var) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n >= min => Ok(Some(n)),
                    _ => Err(ShardError::NotANumber { var, value: v, min }),
                },
            }
        };
        let ours = number("ORCHESTRATE_SHARDS", 1)?;
        let agree = |var: &'static str, count: usize| match ours {
            Some(o) if o != count => {
                Err(ShardError::CountMismatch { a: var, a_value: count, b: "ORCHESTRATE_SHARDS", b_value: o })
            }
            _ => Ok(()),
        };
        let within = |index_var: &'static str, index: usize, count_var: &'static str, count: usize| {
            if index < count {
                Ok(Shard { index, count })
            } else {
                Err(ShardError::OutOfRange { index_var, index, count_var, count })
            }
        };
        match found.first().copied() {
            None => Err(ShardError::NotFound),
            Some("SLURM_ARRAY_TASK_ID") => {
                let id = number("SLURM_ARRAY_TASK_ID", 0)?.expect("found above");
                let count = number("SLURM_ARRAY_TASK_COUNT", 1)?.ok_or(ShardError::MissingCount {
                    index_var: "SLURM_ARRAY_TASK_ID",
                    count_vars: "SLURM_ARRAY_TASK_COUNT",
                    hint: "Slurm sets both for sbatch --array (since 15.08); pass --shard i/n with an older Slurm",
                })?;
                agree("SLURM_ARRAY_TASK_COUNT", count)?;
                let min = number("SLURM_ARRAY_TASK_MIN", 0)?.unwrap_or(0);
                let step = number("SLURM_ARRAY_TASK_STEP", 1)?.unwrap_or(1);
                let gaps = |detail: String| ShardError::SlurmGaps { detail, count, last: count - 1 };
                if id < min || (id - min) % step != 0 {
                    return Err(gaps(format!("task id {id} is not MIN {min} plus a multiple of STEP {step}")));
                }
                if let Some(max) = number("SLURM_ARRAY_TASK_MAX", 0)? {
                    if max < min || (max - min) % step != 0 || (max - min) / step + 1 != count {
                        return Err(gaps(format!("ids {min}..={max} in steps of {step} are not COUNT {count} ids")));
                    }
                }
                within("SLURM_ARRAY_TASK_ID", (id - min) / step, "SLURM_ARRAY_TASK_COUNT", count)
            }
            Some("JOB_COMPLETION_INDEX") => {
                let index = number("JOB_COMPLETION_INDEX", 0)?.expect("found above");
                let count = ours.ok_or(ShardError::MissingCount {
                    index_var: "JOB_COMPLETION_INDEX",
                    count_vars: "ORCHESTRATE_SHARDS",
                    hint: "Kubernetes does not export an Indexed Job's completions; set ORCHESTRATE_SHARDS to it in the pod's env",
                })?;
                within("JOB_COMPLETION_INDEX", index, "ORCHESTRATE_SHARDS", count)
            }
            Some(_) => {
                let index = number("AWS_BATCH_JOB_ARRAY_INDEX", 0)?.expect("found above");
                let (count_var, count) = match number("AWS_BATCH_JOB_ARRAY_SIZE", 1)? {
                    Some(size) => {
                        agree("AWS_BATCH_JOB_ARRAY_SIZE", size)?;
                        ("AWS_BATCH_JOB_ARRAY_SIZE", size)
                    }
                    None => ("ORCHESTRATE_SHARDS", ours.ok_or(ShardError::MissingCount {
                        index_var: "AWS_BATCH_JOB_ARRAY_INDEX",
                        count_vars: "AWS_BATCH_JOB_ARRAY_SIZE or ORCHESTRATE_SHARDS",
                        hint: "set ORCHESTRATE_SHARDS to the array size in the job definition's environment",
                    })?),
                };
                within("AWS_BATCH_JOB_ARRAY_INDEX", index, count_var, count)
            }
        }
    }

    pub fn takes(&self, prompt_index: usize) -> bool {
        prompt_index % self.count == self.index
    }

    /// `i/n`, as `--shard` takes it.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn auto(vars: &[(&str, &str)]) -> Result<Shard, ShardError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Shard::resolve_with(Some("auto"), &move |k: &str| map.get(k).cloned().filter(|v| !v.trim().is_empty()))
    }

    fn shard(index: usize, count: usize) -> Result<Shard, ShardError> {
        Ok(Shard { index, count })
    }

    #[test]
    fn slurm_arrays_count_from_their_first_id_in_their_step() {
        let slurm = |id: &str, min: &str, max: &str, step: &str, count: &str| {
            auto(&[
                ("SLURM_ARRAY_TASK_ID", id),
                ("SLURM_ARRAY_TASK_MIN", min),
                ("SLURM_ARRAY_TASK_MAX", max),
                ("SLURM_ARRAY_TASK_STEP", step),
                ("SLURM_ARRAY_TASK_COUNT", count),
            ])
        };
        assert_eq!(slurm("0", "0", "3", "1", "4"), shard(0, 4));
        assert_eq!(slurm("3", "0", "3", "1", "4"), shard(3, 4));
        // --array=1-4: task 1 is shard 0.
        assert_eq!(slurm("1", "1", "4", "1", "4"), shard(0, 4));
        assert_eq!(slurm("4", "1", "4", "1", "4"), shard(3, 4));
        // --array=10-16:2 is ids 10, 12, 14, 16.
        assert_eq!(slurm("14", "10", "16", "2", "4"), shard(2, 4));
        // What Slurm 22.05 sets for --array=0-6:3 (ids 0, 3, 6) ...
        assert_eq!(slurm("3", "0", "6", "3", "3"), shard(1, 3));
        // ... and for --array=0,2,5 (STEP 1): no range, every task refuses.
        for id in ["0", "2", "5"] {
            assert!(matches!(slurm(id, "0", "5", "1", "3"), Err(ShardError::SlurmGaps { .. })), "{id}");
        }
        assert!(matches!(slurm("3", "0", "6", "2", "4"), Err(ShardError::SlurmGaps { .. })));
        // Older Slurm: no MIN/MAX/STEP; the id is the index.
        assert_eq!(auto(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "3")]), shard(2, 3));
        assert_eq!(
            auto(&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "3")]),
            Err(ShardError::OutOfRange {
                index_var: "SLURM_ARRAY_TASK_ID",
                index: 3,
                count_var: "SLURM_ARRAY_TASK_COUNT",
                count: 3
            })
        );
        assert!(matches!(auto(&[("SLURM_ARRAY_TASK_ID", "1")]), Err(ShardError::MissingCount { .. })));
        assert_eq!(
            auto(&[("SLURM_ARRAY_TASK_ID", "x1"), ("SLURM_ARRAY_TASK_COUNT", "3")]),
            Err(ShardError::NotANumber { var: "SLURM_ARRAY_TASK_ID", value: "x1".into(), min: 0 })
        );
        assert_eq!(
            auto(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "3"), ("ORCHESTRATE_SHARDS", "4")]),
            Err(ShardError::CountMismatch {
                a: "SLURM_ARRAY_TASK_COUNT",
                a_value: 3,
                b: "ORCHESTRATE_SHARDS",
                b_value: 4
            })
        );
        assert_eq!(
            auto(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "3"), ("ORCHESTRATE_SHARDS", "3")]),
            shard(1, 3)
        );
    }

    #[test]
    fn kubernetes_and_aws_batch_take_the_count_from_where_it_is() {
        assert_eq!(auto(&[("JOB_COMPLETION_INDEX", "2"), ("ORCHESTRATE_SHARDS", "5")]), shard(2, 5));
        let e = auto(&[("JOB_COMPLETION_INDEX", "2")]).unwrap_err();
        assert!(e.to_string().contains("ORCHESTRATE_SHARDS"), "{e}");
        assert!(matches!(
            auto(&[("JOB_COMPLETION_INDEX", "5"), ("ORCHESTRATE_SHARDS", "5")]),
            Err(ShardError::OutOfRange { .. })
        ));
        assert_eq!(auto(&[("AWS_BATCH_JOB_ARRAY_INDEX", "7"), ("AWS_BATCH_JOB_ARRAY_SIZE", "10")]), shard(7, 10));
        assert_eq!(auto(&[("AWS_BATCH_JOB_ARRAY_INDEX", "7"), ("ORCHESTRATE_SHARDS", "8")]), shard(7, 8));
        assert!(matches!(
            auto(&[("AWS_BATCH_JOB_ARRAY_INDEX", "7"), ("AWS_BATCH_JOB_ARRAY_SIZE", "10"), ("ORCHESTRATE_SHARDS", "8")]),
            Err(ShardError::CountMismatch { .. })
        ));
        assert!(matches!(auto(&[("AWS_BATCH_JOB_ARRAY_INDEX", "0")]), Err(ShardError::MissingCount { .. })));
        assert_eq!(
            auto(&[("AWS_BATCH_JOB_ARRAY_SIZE", "0"), ("AWS_BATCH_JOB_ARRAY_INDEX", "0")]),
            Err(ShardError::NotANumber { var: "AWS_BATCH_JOB_ARRAY_SIZE", value: "0".into(), min: 1 })
        );
    }

    #[test]
    fn auto_refuses_nothing_and_two_schedulers() {
        assert_eq!(auto(&[]), Err(ShardError::NotFound));
        // A count alone names no shard.
        assert_eq!(auto(&[("ORCHESTRATE_SHARDS", "3"), ("SLURM_ARRAY_TASK_ID", "")]), Err(ShardError::NotFound));
        assert_eq!(
            auto(&[("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_COUNT", "2"), ("JOB_COMPLETION_INDEX", "0")]),
            Err(ShardError::TwoSchedulers { a: "SLURM_ARRAY_TASK_ID", b: "JOB_COMPLETION_INDEX" })
        );
    }

    #[test]
    fn explicit_and_absent_specs_ignore_the_environment() {
        let env = |k: &str| (k == "SLURM_ARRAY_TASK_ID").then(|| "1".to_string());
        assert_eq!(Shard::resolve_with(None, &env), shard(0, 1));
        assert_eq!(Shard::resolve_with(Some("2/3"), &env), shard(2, 3));
        assert!(matches!(Shard::resolve_with(Some("3/3"), &env), Err(ShardError::Malformed { .. })));
        assert!(matches!(Shard::resolve_with(Some("1/0"), &env), Err(ShardError::Malformed { .. })));
        assert!(matches!(Shard::resolve_with(Some("automatic"), &env), Err(ShardError::Malformed { .. })));
        assert_eq!(Shard::parse(" 1 / 2 ").map(|s| s.spec()), Ok("1/2".to_string()));
    }
}
