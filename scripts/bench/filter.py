"""Benchmark: `orchestrate filter` throughput (images/s) against diffusers +
PyTorch RAHF in a plain loop, one run:

  1. the runner: generator batches across prompts, GPU stage (sampling +
     RAHF) overlapped with the CPU stage (PNG encoding, manifest) on a thread;
  2. (`--sequential`) the same binary's plain sequential loop (hidden
     `filter --sequential`): per prompt, generate its images, score them,
     save them, then the next;
  3. Python: diffusers' StableDiffusionPipeline + the PyTorch RAHF of the
     fixture script (tests/fixtures/rahf/make_fixtures.py, imported), the same
     generate -> score (+ keyword decoding) -> save PNG loop, per prompt, in
     its own process.

Models: `--layout tiny` (tests/fixtures/diffusion/sd-tiny + the tiny RAHF
fixture) or `--layout sd15` (SD 1.5's layout with random weights, as
scripts/bench/generate.py builds it, and RAHF at the published size,
ViT-L/16-384 + T5-base, as scripts/bench/rahf.py builds it: the same weights
on both sides, so keyword decoding stops at the same token).

Timed on every side: sampling, scoring, PNG writing and bookkeeping, without
process start-up or model loading (orchestrate: the `run_seconds` of its JSON
summary; Python: around the loop, in the child). Peak resident memory is each
whole process's (wait4's ru_maxrss). The sides alternate, A B A B
(`--repeats`), and each figure is the best run. Not a test: run by hand,

    cargo build [--release]
    .venv/bin/python scripts/bench/filter.py [--bin target/release/orchestrate] [--layout sd15] \
        [--prompts 2] [--samples 8] [--steps 20] [--size 256] [--device cuda] [--dtype fp16] [--json-out F]
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child, write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures"
THINGS = ["cat", "dog", "red cube", "tree", "house", "car", "bird", "boat"]


def orchestrate(bin_, args, env=None):
    rc, out, err, wall, peak = run_child([bin_, *args], env={**os.environ, "RUST_LOG": "warn", **(env or {})})
    if rc != 0:
        sys.exit(f"orchestrate {' '.join(map(str, args[:1]))} failed:\n{err}")
    return out, peak


def run_filter(bin_, model, rahf, prompts, out, a, sequential):
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "filter", "--model", str(model), "--rahf", str(rahf), "--prompts", str(prompts),
        "--samples", str(a.samples), "--steps", str(a.steps), "--height", str(a.size), "--width", str(a.size),
        "--scheduler", "euler-a", "--guidance-scale", "7.5", "--batch-size", str(a.batch_size), "--threshold", "0.15",
        "--device", a.device, "--dtype", a.dtype, "--out", str(out), "--json",
    ]
    if sequential:
        args.append("--sequential")
    out, peak = orchestrate(bin_, args)
    f = json.loads(out)["figures"]
    return f["images_sampled"] / f["run_seconds"], peak


def bench_module(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def python_child(a):
    """The Python side, in its own process: load, then the timed loop. Prints
    {"images_per_s": ...} as its last line."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image

    dev = torch.device("cuda" if a.device.startswith("cuda") else "cpu")
    if dev.type == "cpu" and not a.python_threads_as_is:
        # What the orchestrate job does on a CPU (src/jobs/stages.rs): one core
        # left to the CPU stage. On a busy 2-core box 2 intra-op threads make
        # small models several times slower, so the same count on both sides.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.dtype, torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, torch_dtype=dtype).to(dev)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if a.layout == "sd15":
        rb = bench_module("rahf")
        mf = rb.fixture_module()
        mf.IMAGE_SIZE, mf.MEAN, mf.STD = 384, [0.5] * 3, [0.5] * 3
        from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel
        torch.manual_seed(0)  # rahf.py's build(): the same weights as the imported folder
        vit = ViTModel(ViTConfig(**rb.VIT_L16_384)).eval()
        t5 = T5ForConditionalGeneration(T5Config(**rb.T5_BASE)).eval()
        tok, _ = mf.build_tokenizer()
    else:
        from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration, ViTModel
        spec = importlib.util.spec_from_file_location("rahf_fixtures", FIX / "rahf/make_fixtures.py")
        mf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mf)
        vit = ViTModel.from_pretrained(str(FIX / "rahf/vit")).eval()
        t5 = T5ForConditionalGeneration.from_pretrained(str(FIX / "rahf/t5")).eval()
        tok = PreTrainedTokenizerFast.from_pretrained(str(FIX / "rahf/t5"))
    t5.generation_config.max_length = None
    model = mf.Rahf(vit, t5, multi_head=True).eval().to(dev)
    prompt_list = Path(a.prompt_file).read_text().splitlines()
    out = a.python_child
    os.makedirs(out, exist_ok=True)

    started = time.perf_counter()
    n = 0
    with torch.no_grad():
        for pi, prompt in enumerate(prompt_list):
            images = []
            for lo in range(0, a.samples, a.batch_size):
                idx = list(range(lo, min(lo + a.batch_size, a.samples)))
                gens = [torch.Generator("cpu").manual_seed(i) for i in idx]
                res = pipe([prompt] * len(idx), num_inference_steps=a.steps, height=a.size, width=a.size,
                           guidance_scale=7.5, generator=gens, output_type="np")
                images.extend((res.images * 255).round().astype(np.uint8))
            px = torch.stack([mf.preprocess_torch(im) for im in images]).to(dev)
            ids = torch.tensor([tok(prompt).input_ids] * len(images), device=dev)
            scores = model(px, ids)["scores"].cpu().numpy()
            for i, im in enumerate(images):
                Image.fromarray(im).save(os.path.join(out, f"p{pi:05}_{i}.png"))
            n += len(images)
            _ = scores
    print(json.dumps({"images_per_s": n / (time.perf_counter() - started)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/debug/orchestrate"))
    ap.add_argument("--layout", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=None, help="default 32 (tiny), 256 (sd15)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="the generator's (RAHF: fp32)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternated")
    ap.add_argument("--sequential", action="store_true", help="also time the binary's sequential loop")
    ap.add_argument("--json-out", help="rows for scripts/gpu-check")
    ap.add_argument("--pipeline-dir", help="sd15: the random pipeline's folder, reused when there (generate.py's)")
    ap.add_argument("--rahf-dir", help="sd15: an imported published-size RAHF of rahf.py, reused when there")
    ap.add_argument("--python-threads-as-is", action="store_true",
                    help="CPU: leave PyTorch's thread count as it is (default: the job's, cores - 1)")
    ap.add_argument("--python-child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.size is None:
        a.size = 256 if a.layout == "sd15" else 32
    if a.python_child:
        return python_child(a)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rahf = tmp / "rahf"
        if a.layout == "sd15":
            gb, rb = bench_module("generate"), bench_module("rahf")
            from transformers import CLIPTokenizer
            model = Path(a.pipeline_dir) if a.pipeline_dir else tmp / "sd15-random"
            if not (model / "model_index.json").exists():
                gb.build_pipeline(model, len(CLIPTokenizer.from_pretrained(FIX / "diffusion/sd-tiny/tokenizer")))
            if a.rahf_dir and (Path(a.rahf_dir) / "model.safetensors").exists():
                rahf = Path(a.rahf_dir)  # rahf.py's import of the same seed-0 model
            else:
                mf = rb.fixture_module()
                _, _, ckpt, vit_dir, t5_dir = rb.build(mf, tmp)
                orchestrate(a.bin, ["rahf", "import", "--checkpoint", str(ckpt), "--vit", str(vit_dir),
                                    "--t5", str(t5_dir), "--out", str(rahf)])
                ckpt.unlink()
            config = "SD 1.5 layout (random) + published-size RAHF (random)"
        else:
            model = FIX / "diffusion/sd-tiny"
            orchestrate(a.bin, ["rahf", "import", "--checkpoint", str(FIX / "rahf/multi_head.pt"), "--vit",
                                str(FIX / "rahf/vit"), "--t5", str(FIX / "rahf/t5"), "--out", str(rahf)])
            config = "sd-tiny + tiny RAHF"
        prompt_list = [f"a photo of a {THINGS[i % len(THINGS)]} number {i}" for i in range(a.prompts)]
        prompts = tmp / "prompts.txt"
        prompts.write_text("".join(p + "\n" for p in prompt_list))
        child = [sys.executable, __file__, "--python-child", str(tmp / "python"), "--model", str(model),
                 "--prompt-file", str(prompts), "--layout", a.layout, "--samples", str(a.samples),
                 "--steps", str(a.steps), "--size", str(a.size), "--batch-size", str(a.batch_size),
                 "--device", a.device, "--dtype", a.dtype] + (["--python-threads-as-is"] if a.python_threads_as_is else [])

        res = {"runner": [], "python": [], "sequential": []}
        peaks = {"runner": 0.0, "python": 0.0, "sequential": 0.0}
        for _ in range(a.repeats):  # A B A B
            ips, peak = run_filter(a.bin, model, rahf, prompts, tmp / "runner", a, sequential=False)
            res["runner"].append(ips)
            peaks["runner"] = max(peaks["runner"], peak)
            rc, out, err, _, peak = run_child(child, env=dict(os.environ))
            if rc != 0:
                sys.exit(f"python loop failed:\n{err}")
            res["python"].append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
            peaks["python"] = max(peaks["python"], peak)
            if a.sequential:
                ips, peak = run_filter(a.bin, model, rahf, prompts, tmp / "sequential", a, sequential=True)
                res["sequential"].append(ips)
                peaks["sequential"] = max(peaks["sequential"], peak)

    runner, python = max(res["runner"]), max(res["python"])
    config += (f", {a.prompts} prompts x {a.samples} samples, {a.steps} euler-a steps, CFG 7.5, {a.size}x{a.size}, "
               f"batch {a.batch_size}, {a.device} {a.dtype}, " + ("" if a.device.startswith("cuda") else "torch threads: " + ("PyTorch as is" if a.python_threads_as_is else "both sides the job's, cores - 1")))
    print(f"config: {config}")
    print(f"orchestrate runner (overlapped) : {runner:8.3f} images/s, peak {peaks['runner']:.2f} GiB")
    if a.sequential:
        print(f"orchestrate sequential loop     : {max(res['sequential']):8.3f} images/s, peak {peaks['sequential']:.2f} GiB")
    print(f"diffusers + PyTorch RAHF loop   : {python:8.3f} images/s, peak {peaks['python']:.2f} GiB")
    print(f"runner / python = {runner / python:.2f}x" +
          (f", runner / sequential = {runner / max(res['sequential']):.2f}x" if a.sequential else ""))
    rows = [
        {"what": f"filter ({a.layout}) img/s (ours/diffusers+PyTorch RAHF, target >= 1.3)",
         "figure": f"{runner:.3f} / {python:.3f} = {runner / python:.2f}x"},
        {"what": f"filter ({a.layout}) peak host memory GiB (ours vs Python)", "figure": f"{peaks['runner']:.2f} vs {peaks['python']:.2f}"},
    ]
    write_rows(a.json_out, rows, config=config, images_per_s=res, peak_gib=peaks)


if __name__ == "__main__":
    main()
