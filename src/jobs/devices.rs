//! `orchestrate run RECIPE --devices all|cuda:0,cuda:1|cpu,cpu`: every device
//! of one machine on one recipe.
//!
//! The recipe's jobs run as stages, in order. For each stage this process
//! starts one worker per device — `orchestrate run RECIPE --job JOB --shard
//! i/n --device D` with `n` the number of devices, shard `i` on device `i` —
//! shows their progress as one display, and when all finished merges their
//! shard folders (`output/JOB/shard-i-of-n/`) into `output/JOB/` before the
//! next stage starts. So a stage that reads an earlier one (`inpaint.input:
//! filter`) reads its merged, whole result, and the outputs are those of a
//! run on one device (the shard folders stay beside them: they are what a
//! rerun resumes from).
//!
//! When a worker fails, the others are stopped (they are resumable: the runner
//! survives `kill -9`) and the run fails with that worker's own error; the
//! same command run again resumes every shard where it stopped.
//!
//! A worker whose parent disappears stops on its own (see `main.rs`).
use crate::error::{Error, Result};
use crate::jobs::merge::merge;
use crate::jobs::{JobSummary, Shard};
use crate::progress::{Aggregate, Event};
use crate::recipe::{job_dir, Recipe};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The devices `--devices` names, each as `--device` takes it: every visible
/// CUDA device for `all`, else the comma-separated list (`cpu` and `cuda[:N]`
/// entries; a device may repeat, e.g. `cpu,cpu`). CPU and CUDA workers do not
/// mix: `dtype: auto` means fp32 on one and fp16 on the other, and shards of
/// one run must compute alike.
pub fn parse_devices(spec: &str) -> Result<Vec<String>> {
    if spec.trim() == "all" {
        let n = tch::Cuda::device_count();
        if n <= 0 {
            return Err(Error::Device(format!(
                "--devices all: no CUDA device is visible ({}); for several CPU workers give --devices cpu,cpu",
                crate::env_report::cuda_absence_reason()
            )));
        }
        return Ok((0..n).map(|i| format!("cuda:{i}")).collect());
    }
    let mut devices = Vec::new();
    for entry in spec.split(',').map(str::trim) {
        let name = match entry {
            "" => return Err(Error::Device(format!("--devices `{spec}`: an empty entry; expected all, or a list like cuda:0,cuda:1 or cpu,cpu"))),
            "auto" => return Err(Error::Device(format!("--devices `{spec}`: name each device (cpu, cuda:N) instead of auto, or give all"))),
            "cuda" => "cuda:0".to_string(),
            e => e.to_string(),
        };
        crate::device::parse_device(&name).map_err(|e| Error::Device(format!("--devices `{spec}`: {e}")))?;
        devices.push(name);
    }
    let cpus = devices.iter().filter(|d| *d == "cpu").count();
    if cpus > 0 && cpus < devices.len() {
        return Err(Error::Device(format!(
            "--devices `{spec}`: CPU and CUDA workers in one run would compute shards differently (fp32 and fp16 for dtype auto); use one kind"
        )));
    }
    Ok(devices)
}

/// How the workers are started: this binary, the recipe as given, and the
/// `--output` override when there is one.
pub struct Workers {
    pub exe: PathBuf,
    pub recipe: PathBuf,
    pub output: Option<PathBuf>,
    pub devices: Vec<String>,
}

impl Workers {
    fn command(&self, job: &str, shard: Shard, device: &str, cpu_cores: Option<usize>) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("run").arg(&self.recipe).args(["--job", job, "--shard", &shard.spec(), "--device", device, "--worker"]);
        if let Some(out) = &self.output {
            c.arg("--output").arg(out);
        }
        if let Some(k) = cpu_cores {
            c.args(["--cpu-cores", &k.to_string()]);
        }
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }
}

/// Runs `recipe`'s jobs (`only`: just that one) over `workers.devices`; see
/// the module doc. `done` sees each stage's summary (its merge's) as it ends.
pub fn run(
    recipe: &mut Recipe,
    workers: &Workers,
    only: Option<&str>,
    json: bool,
    done: &mut dyn FnMut(&JobSummary),
) -> Result<Vec<JobSummary>> {
    recipe.validate()?;
    recipe.resolve_size()?;
    let jobs = recipe.selected_jobs(only)?;
    let n = workers.devices.len();
    let mut summaries = Vec::new();
    for job in jobs {
        let s = if let Some(s) = recipe.skipped(job)? {
            s
        } else if n == 1 || !Recipe::shardable(job) {
            // One device, or a job that runs as one process (finetune):
            // no shards to merge; the job runs here, on the first device.
            recipe.common.models.device = workers.devices[0].clone();
            recipe.run_job(job, Shard::default(), json)?
        } else {
            run_stage(recipe, workers, job)?;
            let shards: Vec<PathBuf> =
                (0..n).map(|index| job_dir(&recipe.output, job, Shard { index, count: n })).collect();
            merge(&job_dir(&recipe.output, job, Shard::default()), &shards, false)?
        };
        done(&s);
        summaries.push(s);
    }
    Ok(summaries)
}

/// What a worker's reader threads hand the supervising loop.
enum Msg {
    Out(String),
    Err(String),
    Closed,
}

/// Forwards `pipe`'s lines (lossily decoded) to `tx` as worker `i`'s, then `Closed`.
fn forward<R: std::io::Read + Send + 'static>(
    pipe: R,
    i: usize,
    wrap: fn(String) -> Msg,
    tx: std::sync::mpsc::Sender<(usize, Msg)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                    if tx.send((i, wrap(line))).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send((i, Msg::Closed));
    })
}

/// Starts one worker per device on `job`, shows their progress, and waits
/// for all; the first to fail stops the others and is the error.
fn run_stage(recipe: &Recipe, workers: &Workers, job: &str) -> Result<()> {
    let n = workers.devices.len();
    let cpu_workers = workers.devices.iter().filter(|d| *d == "cpu").count();
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let cpu_share = (cpu_workers > 0).then(|| (cores / cpu_workers).max(1));
    let labels: Vec<String> = workers.devices.iter().enumerate().map(|(i, d)| format!("{i}:{d}")).collect();
    tracing::info!("{job}: {n} workers ({}) over {}", workers.devices.join(", "), recipe.output.display());
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Msg)>();
    let mut children: Vec<Option<Child>> = Vec::new();
    let mut readers = Vec::new();
    let stop_all = |children: &mut Vec<Option<Child>>| {
        for c in children.iter_mut().flatten() {
            let _ = c.kill();
        }
    };
    for (i, device) in workers.devices.iter().enumerate() {
        let shard = Shard { index: i, count: n };
        let mut cmd = workers.command(job, shard, device, cpu_share.filter(|_| device == "cpu"));
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children);
                for c in children.iter_mut().flatten() {
                    let _ = c.wait();
                }
                return Err(Error::io(&workers.exe, e));
            }
        };
        let (out, err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        readers.push(forward(out, i, Msg::Out, tx.clone()));
        readers.push(forward(err, i, Msg::Err, tx.clone()));
        children.push(Some(child));
    }
    drop(tx);

    let mut display = Aggregate::new(job, labels.clone());
    let mut open = vec![2usize; n];
    let mut tails: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut statuses: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    let mut first_failure: Option<usize> = None;
    // Every message until every pipe closed: workers that are killed close theirs too.
    for (i, msg) in rx {
        match msg {
            Msg::Out(line) => match serde_json::from_str::<Event>(&line) {
                Ok(ev) => display.event(i, ev),
                Err(_) => display.println(&format!("[{}] {line}", labels[i])),
            },
            Msg::Err(line) => {
                display.println(&format!("[{}] {line}", labels[i]));
                tails[i].push(line);
                if tails[i].len() > 40 {
                    tails[i].remove(0);
                }
            }
            Msg::Closed => {
                open[i] -= 1;
                if open[i] == 0 {
                    let Some(mut child) = children[i].take() else { continue };
                    // A status that cannot be read counts as a failure.
                    statuses[i] = child.wait().ok();
                    if !statuses[i].is_some_and(|s| s.success()) && first_failure.is_none() {
                        first_failure = Some(i);
                        stop_all(&mut children);
                    }
                }
            }
        }
    }
    for r in readers {
        let _ = r.join();
    }
    display.finish();
    if let Some(i) = first_failure {
        let tail = &tails[i];
        let message = tail
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .map(str::to_string)
            .unwrap_or_else(|| {
                let last: Vec<&str> = tail.iter().rev().take(5).rev().map(String::as_str).collect();
                format!(
                    "exited with {}{}",
                    statuses[i].map_or("no status".to_string(), |s| s.to_string()),
                    if last.is_empty() { String::new() } else { format!("; its last lines: {}", last.join(" | ")) }
                )
            });
        return Err(Error::Worker {
            job: job.into(),
            shard: format!("{i}/{n}"),
            device: workers.devices[i].clone(),
            message: format!("{message} (the other workers were stopped; run the same command again to resume)"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_and_refuse_mixtures() {
        assert_eq!(parse_devices("cpu,cpu").unwrap(), vec!["cpu", "cpu"]);
        assert_eq!(parse_devices(" cpu ").unwrap(), vec!["cpu"]);
        for bad in ["cpu,", "auto", "cpu,gpu", ""] {
            assert!(matches!(parse_devices(bad), Err(Error::Device(_))), "{bad}");
        }
        if tch::Cuda::device_count() == 0 {
            let e = parse_devices("all").unwrap_err().to_string();
            assert!(e.contains("cpu,cpu"), "{e}");
            assert!(parse_devices("cuda:0,cuda:1").is_err());
        } else {
            assert!(parse_devices("cpu,cuda:0").unwrap_err().to_string().contains("one kind"));
        }
    }
}
