"""Benchmark: `orchestrate filter` throughput (images/s) three ways, one run,
same tiny config (tests/fixtures/diffusion/sd-tiny + the tiny RAHF fixture):

  1. the runner: generator batches across prompts, GPU stage (sampling +
     RAHF) overlapped with the CPU stage (PNG encoding, manifest) on a thread;
  2. the same binary's plain sequential loop (hidden `filter --sequential`):
     per prompt, generate its images, score them, save them, then the next;
  3. Python: diffusers' StableDiffusionPipeline + the PyTorch RAHF of the
     fixture script (tests/fixtures/rahf/make_fixtures.py, imported), the same
     generate -> score (+ keyword decoding) -> save PNG loop, per prompt.

Not a test: run by hand,

    cargo build [--release]
    /root/.cache/orchestrate/torch-2.11.0/bin/python scripts/bench/filter.py \
        [--bin target/release/orchestrate] [--prompts 16] [--samples 4] [--steps 4] [--device cpu]

Timed on every side: sampling, scoring, PNG writing and bookkeeping, without
process start-up or model loading (orchestrate: the `run_seconds` of its JSON
summary; Python: around the loop). Prints images/s and the ratios.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures"


def orchestrate(bin_, args):
    out = subprocess.run([bin_, *args], capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"})
    if out.returncode != 0:
        sys.exit(f"orchestrate {' '.join(args[:1])} failed:\n{out.stderr}")
    return out.stdout


def run_filter(bin_, rahf, prompts, out, a, sequential):
    args = [
        "filter", "--model", str(FIX / "diffusion/sd-tiny"), "--rahf", str(rahf), "--prompts", str(prompts),
        "--samples", str(a.samples), "--steps", str(a.steps), "--height", str(a.size), "--width", str(a.size),
        "--scheduler", "euler-a", "--batch-size", str(a.batch_size), "--threshold", "0.15",
        "--device", a.device, "--out", str(out), "--json",
    ]
    if sequential:
        args.append("--sequential")
    f = json.loads(orchestrate(bin_, args))["figures"]
    return f["images_sampled"] / f["run_seconds"]


def python_loop(prompt_list, out, a):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image
    from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration, ViTModel

    spec = importlib.util.spec_from_file_location("rahf_fixtures", FIX / "rahf/make_fixtures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    dev = torch.device("cuda" if a.device.startswith("cuda") else "cpu")
    pipe = StableDiffusionPipeline.from_pretrained(str(FIX / "diffusion/sd-tiny"), safety_checker=None).to(dev)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # The tiny fixture RAHF's architecture (weights do not change the cost).
    vit = ViTModel.from_pretrained(str(FIX / "rahf/vit")).eval()
    t5 = T5ForConditionalGeneration.from_pretrained(str(FIX / "rahf/t5")).eval()
    t5.generation_config.max_length = None
    tok = PreTrainedTokenizerFast.from_pretrained(str(FIX / "rahf/t5"))
    model = mf.Rahf(vit, t5, multi_head=True).eval().to(dev)
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
                           generator=gens, output_type="np")
                images.extend((res.images * 255).round().astype(np.uint8))
            px = torch.stack([mf.preprocess_torch(im) for im in images]).to(dev)
            ids = torch.tensor([tok(prompt).input_ids] * len(images), device=dev)
            scores = model(px, ids)["scores"].cpu().numpy()
            for i, im in enumerate(images):
                Image.fromarray(im).save(os.path.join(out, f"p{pi:05}_{i}.png"))
            n += len(images)
            _ = scores
    return n / (time.perf_counter() - started)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/debug/orchestrate"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rahf = tmp / "rahf"
        orchestrate(a.bin, ["rahf", "import", "--checkpoint", str(FIX / "rahf/multi_head.pt"), "--vit",
                            str(FIX / "rahf/vit"), "--t5", str(FIX / "rahf/t5"), "--out", str(rahf)])
        things = ["cat", "dog", "red cube", "tree", "house", "car", "bird", "boat"]
        prompt_list = [f"a photo of a {things[i % len(things)]} number {i}" for i in range(a.prompts)]
        prompts = tmp / "prompts.txt"
        prompts.write_text("".join(p + "\n" for p in prompt_list))

        runner = run_filter(a.bin, rahf, prompts, tmp / "runner", a, sequential=False)
        sequential = run_filter(a.bin, rahf, prompts, tmp / "sequential", a, sequential=True)
        python = python_loop(prompt_list, tmp / "python", a)

    print(f"config: sd-tiny + tiny RAHF, {a.prompts} prompts x {a.samples} samples, {a.steps} steps, "
          f"{a.size}x{a.size}, batch {a.batch_size}, device {a.device}, torch threads {torch.get_num_threads()}")
    print(f"orchestrate runner (overlapped) : {runner:8.2f} images/s")
    print(f"orchestrate sequential loop     : {sequential:8.2f} images/s")
    print(f"diffusers + PyTorch RAHF loop   : {python:8.2f} images/s")
    print(f"runner / sequential = {runner / sequential:.2f}x, runner / python = {runner / python:.2f}x, "
          f"sequential / python = {sequential / python:.2f}x")


if __name__ == "__main__":
    main()
