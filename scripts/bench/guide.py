"""Benchmark: what score guidance costs, as seconds per image, guided vs
unguided, on SD 1.5's layout (random weights, scripts/bench/generate.py's
pipeline), with the gradient decoded by the full VAE and by a TAESD of the
real layout (diffusers' AutoencoderTiny defaults, random weights:
`--guide-decoder tiny:DIR`).

Also timed there: heatmap-masked guidance (`--region`, with the tiny
decoder; threshold 0, so its cost is the method's whatever the random
heatmap marks), and noise optimisation (`--method noise`, 5 iterations) on
a few-step setting (2 Euler-a steps, no CFG: SD-Turbo's), against unguided
sampling of that setting. Every run's peak resident memory is reported
(`wait4`'s ru_maxrss); `--memory` adds guidance at 512x512 (2 steps: the
peak does not grow with the step count), and `--methods` runs each method
with `--compare best-of-n` on the tiny fixture models (the quickstart's size)
over 8 prompts: does guidance beat random search at equal time?

The scorer is the tiny RAHF fixture (tests/fixtures/rahf), so the figures are
the generator's side of the cost: UNet forward and backward, decode and its
backward; a real scorer adds its own forward and backward to the guided side.

Not a test: run by hand,

    scripts/setup.sh --fixtures
    cargo build --release
    .venv/bin/python scripts/bench/guide.py [--size 256] [--steps 10] [--device cpu] [--memory] [--methods]

Timings are the `guided_seconds_per_image` / `unguided_seconds_per_image` of
`orchestrate guide --json` (sampling only: no model loading, no scoring of the
saved images). Each decoder runs in its own output folder; the unguided
figure is the mean over both runs.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures"


def bench_module(name):
    """Another script of scripts/bench/, imported (its helpers, one copy)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / f"scripts/bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


orchestrate = bench_module("filter").orchestrate
run_child = bench_module("common").run_child


def build_taesd(folder: Path):
    """TAESD's real layout (what madebyollin/taesd publishes for SD 1.x/2.x):
    diffusers' AutoencoderTiny defaults, random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(folder, safe_serialization=True)


def peak_mib(bin_, args):
    """Runs orchestrate and returns (--json output, peak RSS in MiB) of that child
    alone (its own VmHWM: wait4's ru_maxrss would carry this process's, which
    holds the Python pipeline, over fork+exec; see common.run_child)."""
    rc, out, err, _, peak_gib = run_child([bin_, *args], env={**os.environ, "RUST_LOG": "warn"})
    if rc != 0:
        sys.exit(f"orchestrate {args[0]} failed:\n{err}")
    return json.loads(out), peak_gib * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bin", default=str(ROOT / "target/release/orchestrate"))
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak memory of guidance at 512x512 (2 steps: the peak does not grow with steps)")
    ap.add_argument("--methods", action="store_true",
                    help="also compare the methods with best-of-N at equal time on the tiny fixture models")
    ap.add_argument("--methods-only", action="store_true", help="only the --methods comparison")
    ap.add_argument("--memory-only", action="store_true", help="only the --memory figures")
    ap.add_argument("--memory-sdxl", action="store_true",
                    help="only peak memory of guidance at 1024x1024 on SDXL base's real layout (random weights)")
    ap.add_argument("--sdxl-dir", help="--memory-sdxl: where the random SDXL pipeline is saved, and reused when there")
    ap.add_argument("--sdxl-runs", nargs="*", help="--memory-sdxl: only these runs (by name)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="the generator's dtype")
    args = ap.parse_args()

    generate = bench_module("generate")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(FIX / "diffusion/sd-tiny/tokenizer")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.memory_sdxl:
            generate.build_pipeline(tmp / "sd15-random", len(tokenizer))
        # CLIP's special token ids as the tiny vocabulary has them (`guide`
        # checks them against the tokenizer; they do not change the cost).
        for te_config in [tmp / "sd15-random/text_encoder/config.json"] * (not args.memory_sdxl):
            te = json.loads(te_config.read_text())
            te.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
            te_config.write_text(json.dumps(te))
        build_taesd(tmp / "taesd-random")
        rahf = tmp / "rahf"
        orchestrate(args.bin, ["rahf", "import", "--checkpoint", str(FIX / "rahf/multi_head.pt"),
                               "--vit", str(FIX / "rahf/vit"), "--t5", str(FIX / "rahf/t5"), "--out", str(rahf)])
        prompts = tmp / "prompts.txt"
        prompts.write_text("a photo of a cat\n")
        taesd = f"tiny:{tmp / 'taesd-random'}"

        def guide(name, size, steps, extra, model=None, prompts_file=None, rahf_dir=None):
            return peak_mib(args.bin, [
                "guide", "--model", str(model or tmp / "sd15-random"), "--rahf", str(rahf_dir or rahf),
                "--prompts", str(prompts_file or prompts),
                "--images-per-prompt", str(args.images), "--batch-size", str(args.images),
                "--steps", str(steps), "--height", str(size), "--width", str(size),
                "--device", args.device, "--dtype", args.dtype, "--out", str(tmp / f"out-{name}"), "--json", *extra,
            ])

        if args.memory_sdxl:
            print(json.dumps({"peak_rss_mib_sdxl_1024": memory_sdxl(args, tmp, guide, taesd)}, indent=2))
            return

        if args.methods_only:
            print(json.dumps({"methods_tiny": compare_methods(args, tmp, guide)}, indent=2))
            return
        if args.memory_only:
            print(json.dumps({"peak_rss_mib_512": memory_512(guide, taesd)}, indent=2))
            return
        ddim = ["--scheduler", "ddim", "--guidance-strength", "10"]
        runs = {
            "vae": (args.steps, ddim + ["--guide-decoder", "vae"]),
            "taesd": (args.steps, ddim + ["--guide-decoder", taesd]),
            # The heatmap's region (threshold 0: the whole image, so the cost is
            # the method's, not the fixture heatmap's extent).
            "region_taesd": (args.steps, ddim + ["--guide-decoder", taesd, "--region", "implausibility",
                                                 "--mask-threshold", "0"]),
        }
        # Noise optimisation on a few-step setting (SD-Turbo's: Euler ancestral,
        # 2 steps, no CFG), and unguided sampling of that setting for its ratio.
        turbo = ["--scheduler", "euler-a", "--guidance-scale", "0"]
        runs["turbo_unguided"] = (2, turbo + ["--guidance-strength", "0"])
        runs["noise_taesd"] = (2, turbo + ["--method", "noise", "--iterations", "5", "--guide-decoder", taesd])
        results = {}
        for name, (steps, extra) in runs.items():
            f, mib = guide(name, args.size, steps, extra)
            f = f["figures"]
            results[name] = (f["guided_seconds_per_image"], f["unguided_seconds_per_image"], mib)
        unguided = sum(results[k][1] for k in ["vae", "taesd"]) / 2
        turbo_unguided = results["turbo_unguided"][1]
        report.update({
            "config": f"SD 1.5 layout, random weights, {args.size}x{args.size}, {args.steps} DDIM steps, CFG 7.5, "
                      f"guided every step through the UNet, tiny RAHF scorer, {args.images} image(s) per batch, "
                      f"{args.device}, torch threads {torch.get_num_threads()}; noise optimisation: 2 Euler-a steps, "
                      f"no CFG, 5 iterations",
            "unguided_s_per_image": round(unguided, 3),
            "guided_vae_s_per_image": round(results["vae"][0], 3),
            "guided_taesd_s_per_image": round(results["taesd"][0], 3),
            "guided_region_taesd_s_per_image": round(results["region_taesd"][0], 3),
            "ratio_guided_vae_over_unguided": round(results["vae"][0] / unguided, 3),
            "ratio_guided_taesd_over_unguided": round(results["taesd"][0] / unguided, 3),
            "ratio_region_taesd_over_unguided": round(results["region_taesd"][0] / unguided, 3),
            "turbo_unguided_s_per_image": round(turbo_unguided, 3),
            "noise_taesd_s_per_image": round(results["noise_taesd"][0], 3),
            "ratio_noise_taesd_over_turbo_unguided": round(results["noise_taesd"][0] / turbo_unguided, 3),
            "peak_rss_mib": {k: round(v[2]) for k, v in results.items()},
        })
        if args.memory:
            report["peak_rss_mib_512"] = memory_512(guide, taesd)
        if args.methods:
            report["methods_tiny"] = compare_methods(args, tmp, guide)
    print(json.dumps(report, indent=2))


def memory_512(guide, taesd):
    """Peak resident memory (MiB) of guidance at 512x512, 2 DDIM steps, and of unguided sampling."""
    ddim = ["--scheduler", "ddim", "--guidance-strength", "10"]
    mem = {}
    for name, extra in [("vae", ddim + ["--guide-decoder", "vae"]),
                        ("vae_checkpointed", ddim + ["--guide-decoder", "vae", "--gradient-checkpointing"]),
                        ("taesd", ddim + ["--guide-decoder", taesd]),
                        ("taesd_checkpointed", ddim + ["--guide-decoder", taesd, "--gradient-checkpointing"]),
                        ("unguided", ["--scheduler", "ddim", "--guidance-strength", "0", "--compare", "none"])]:
        _, mib = guide(f"mem-{name}", 512, 2, extra)
        mem[name] = round(mib)
    return mem


def memory_sdxl(args, tmp, guide, taesd):
    """Peak resident memory (MiB) of guidance at 1024x1024 on SDXL base's real
    layout (generate.py's random pipeline at full width; TAESD's layout is the
    same for SDXL), 2 Euler steps with CFG, and of unguided sampling; and of
    noise optimisation in SDXL-Turbo's setting (512x512, one step). The
    pipeline is written in fp32 and converted to --dtype while loading."""
    folder = Path(args.sdxl_dir) if args.sdxl_dir else tmp / "sdxl-random"
    if not (folder / "model_index.json").exists():
        pipe = bench_module("generate").build_sdxl_pipeline(folder, 1.0)
        del pipe
        import gc
        gc.collect()
    euler = ["--scheduler", "euler", "--guidance-strength", "10"]
    # SDXL-Turbo's setting for noise optimisation: 512x512, 1 Euler-a step, no CFG.
    turbo = ["--scheduler", "euler-a", "--guidance-scale", "0", "--method", "noise", "--iterations", "2"]
    mem = {"dtype": args.dtype}
    # The default gradient goes through the UNet; --no-unet-gradient holds
    # the UNet's output constant (no UNet backward).
    held = ["--no-unet-gradient"]
    runs = [
        ("unguided", 1024, ["--scheduler", "euler", "--guidance-strength", "0", "--compare", "none"]),
        ("taesd", 1024, euler + ["--guide-decoder", taesd]),
        # --gradient-checkpointing segments the UNet's backward (and the VAE's).
        ("taesd_checkpointed", 1024, euler + ["--guide-decoder", taesd, "--gradient-checkpointing"]),
        ("vae_checkpointed", 1024, euler + ["--guide-decoder", "vae", "--gradient-checkpointing"]),
        ("noise_turbo_512_taesd", 512, turbo + ["--guide-decoder", taesd]),
        ("taesd_no_unet_gradient", 1024, euler + held + ["--guide-decoder", taesd]),
        ("vae_checkpointed_no_unet_gradient", 1024, euler + held + ["--guide-decoder", "vae", "--gradient-checkpointing"]),
        ("vae_no_unet_gradient", 1024, euler + held + ["--guide-decoder", "vae"]),
    ]
    for name, size, extra in [r for r in runs if not args.sdxl_runs or r[0] in args.sdxl_runs]:
        try:
            _, mib = guide(f"mem-sdxl-{name}", size, 1 if name.startswith("noise") else 2, extra, model=folder)
            mem[name] = round(mib)
        except SystemExit as e:  # an out-of-memory kill is a figure too
            mem[name] = f"failed: {str(e)[-300:]}"
        print(name, mem[name], flush=True)
    return mem


def compare_methods(args, tmp, guide):
    """Each method against best-of-N at its own measured time, on the tiny
    fixture pipeline and RAHF (the quickstart's size), 8 prompts."""
    words = ["cat", "dog", "house", "car", "tree", "bird", "boat", "horse"]
    prompts = tmp / "prompts8.txt"
    prompts.write_text("".join(f"a photo of a {w}\n" for w in words))
    model = FIX / "diffusion/sd-tiny"
    rahf = tmp / "rahf"
    out = {}
    for name, steps, extra in [
        ("gradient", 10, ["--scheduler", "ddim", "--guidance-strength", "10"]),
        ("gradient_region", 10, ["--scheduler", "ddim", "--guidance-strength", "10", "--region", "implausibility",
                                 "--mask-threshold", "0.48"]),
        ("noise", 2, ["--scheduler", "euler-a", "--guidance-scale", "0", "--method", "noise"]),
    ]:
        f, _ = guide(f"methods-{name}", 32, steps, extra + ["--compare", "best-of-n"], model=model,
                     prompts_file=prompts, rahf_dir=rahf)
        f = f["figures"]
        b = f["best_of_n"]
        out[name] = {
            "mean_unguided": round(f["mean_unguided"], 4),
            "mean_guided": round(f["mean_guided"], 4),
            "mean_best_of_n": round(b["mean"], 4),
            "best_of_n_candidates": round(b["mean_candidates"], 1),
            "guided_higher_than_best_of_n": f"{b['guided_higher']}/{b['compared']}",
            "best_of_n_seconds_over_budget": round(b["seconds"] / b["budget_seconds"], 3),
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
