"""What the benchmarks share: a child process timed with its own peak memory,
the lever switches, and the `--json-out` rows scripts/gpu-check collects."""
import json
import os
import subprocess
import tempfile
import time

# The performance levers: each is an environment variable the binary reads
# (src/perf.rs); "1" on, "0" off. The benchmarks time each both ways.
LEVERS = {
    "channels_last": "ORCHESTRATE_CHANNELS_LAST",
    "cudnn_benchmark": "ORCHESTRATE_CUDNN_BENCHMARK",
    "noise_on_device": "ORCHESTRATE_NOISE_ON_DEVICE",
    "vit_sdpa": "ORCHESTRATE_VIT_SDPA",
    "t5_sdpa": "ORCHESTRATE_T5_SDPA",
}


def _hwm_gib(pid):
    """The process's peak resident memory so far (VmHWM), GiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def run_child(cmd, env=None):
    """Runs `cmd` to completion. Returns (returncode, stdout, stderr, wall seconds,
    peak resident memory in GiB of that process alone).

    The peak is the child's own VmHWM, read every 50 ms while it runs (the
    last reading before it exits). Not wait4's ru_maxrss: Linux carries the
    parent's high-water mark into a child through fork/vfork and exec, so a
    child's ru_maxrss is never below this (large) Python process's RSS."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env, text=True)
        peak = 0.0
        while proc.poll() is None:
            hwm = _hwm_gib(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            time.sleep(0.05)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), wall, peak


def self_peak_gib():
    """This process's peak resident memory so far, GiB."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_rows(path, rows, **extra):
    """rows: [{"what", "figure", "note"?}] for scripts/gpu-check's table."""
    if path:
        with open(path, "w") as f:
            json.dump({"rows": rows, **extra}, f, indent=1)
