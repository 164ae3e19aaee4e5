"""Benchmark: what score guidance costs, as seconds per image, guided vs
unguided, on SD 1.5's layout (random weights, scripts/bench/generate.py's
pipeline), with the gradient decoded by the full VAE and by a TAESD of the
real layout (diffusers' AutoencoderTiny defaults, random weights:
`--guide-decoder tiny:DIR`).

The scorer is the tiny RAHF fixture (tests/fixtures/rahf), so the figures are
the generator's side of the cost: UNet forward and backward, decode and its
backward; a real scorer adds its own forward and backward to the guided side.

Not a test: run by hand,

    scripts/setup.sh --fixtures
    cargo build --release
    .venv/bin/python scripts/bench/guide.py [--size 256] [--steps 10] [--device cpu]

Timings are the `guided_seconds_per_image` / `unguided_seconds_per_image` of
`orchestrate guide --json` (sampling only: no model loading, no scoring of the
saved images). Each decoder runs in its own output folder; the unguided
figure is the mean over both runs.
"""
import argparse
import importlib.util
import json
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


def build_taesd(folder: Path):
    """TAESD's real layout (what madebyollin/taesd publishes for SD 1.x/2.x):
    diffusers' AutoencoderTiny defaults, random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(folder, safe_serialization=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bin", default=str(ROOT / "target/release/orchestrate"))
    args = ap.parse_args()

    generate = bench_module("generate")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(FIX / "diffusion/sd-tiny/tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate.build_pipeline(tmp / "sd15-random", len(tokenizer))
        # CLIP's special token ids as the tiny vocabulary has them (`guide`
        # checks them against the tokenizer; they do not change the cost).
        te_config = tmp / "sd15-random/text_encoder/config.json"
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
        results = {}
        for name, decoder in [("vae", "vae"), ("taesd", f"tiny:{tmp / 'taesd-random'}")]:
            out = json.loads(orchestrate(args.bin, [
                "guide", "--model", str(tmp / "sd15-random"), "--rahf", str(rahf), "--prompts", str(prompts),
                "--images-per-prompt", str(args.images), "--batch-size", str(args.images),
                "--steps", str(args.steps), "--height", str(args.size), "--width", str(args.size),
                "--scheduler", "ddim", "--guidance-strength", "10", "--guide-decoder", decoder,
                "--device", args.device, "--out", str(tmp / f"out-{name}"), "--json",
            ]))["figures"]
            results[name] = (out["guided_seconds_per_image"], out["unguided_seconds_per_image"])
        unguided = sum(u for _, u in results.values()) / len(results)
        print(json.dumps({
            "config": f"SD 1.5 layout, random weights, {args.size}x{args.size}, {args.steps} DDIM steps, CFG 7.5, "
                      f"guided every step through the UNet, tiny RAHF scorer, {args.images} image(s) per batch, "
                      f"{args.device}, torch threads {torch.get_num_threads()}",
            "unguided_s_per_image": round(unguided, 3),
            "guided_vae_s_per_image": round(results["vae"][0], 3),
            "guided_taesd_s_per_image": round(results["taesd"][0], 3),
            "ratio_guided_vae_over_unguided": round(results["vae"][0] / unguided, 3),
            "ratio_guided_taesd_over_unguided": round(results["taesd"][0] / unguided, 3),
        }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
