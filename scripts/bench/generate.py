"""Benchmark: `orchestrate generate` against diffusers' StableDiffusionPipeline
(`--layout sd15`, SD 1.5's sizes) or StableDiffusionXLPipeline (`--layout sdxl`:
SDXL's real block layout — three levels, transformer depths 1/2/10, two text
encoders of 12 and 32 layers, text_time conditioning — at half width), same
random weights, same settings, same machine, one run.

Two ratios ours/theirs (target <= 0.9: the same libtorch kernels run
underneath, so every gain is layout, batching, copies and syncs):

- sampling only (`--mode sampling`): prompt encoding, denoising, decoding, as
  the binary's own "sampled N images in X s" line (PNG writing included) and
  around diffusers' pipeline call (in this process, pipeline in memory);
- whole process (`--mode process`): `orchestrate generate` against a Python
  process that imports diffusers, loads the same saved pipeline, samples and
  writes the PNGs; each side's peak resident memory (wait4's ru_maxrss).

`--levers [NAME ...]` also times orchestrate's sampling with each lever of
scripts/bench/common.py on and off (its environment variable 1/0), on off on
off. Every comparison alternates its two sides (A B A B) so drift in the
machine's load hits both alike; each figure is the minimum over the repeats.
Not a test: run by hand,

    scripts/setup.sh --fixtures
    cargo build --release
    .venv/bin/python scripts/bench/generate.py [--layout sd15|sdxl] [--size 512] [--steps 20] \
        [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--mode both] [--levers] [--json-out F]

The pipeline has SD 1.5's UNet/VAE/text-encoder configs with random weights and
the tiny fixture tokenizer (the vocabulary does not change the cost).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LEVERS, run_child, write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def build_pipeline(folder: Path, vocab_size: int):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD 1.5's unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(  # SD 1.5's vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(  # SD 1.5's text_encoder, with the tiny vocabulary
        vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # the tiny tokenizer's (sd-tiny's text_encoder config)
    ))
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "tests/fixtures/diffusion/sd-tiny/tokenizer")
    scheduler = DDIMScheduler.from_pretrained(ROOT / "tests/fixtures/diffusion/sd-tiny/scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_sdxl_pipeline(folder: Path, width_scale: float):
    """SDXL base's configs with every width multiplied by `width_scale`
    (layers, depths and head counts as released), random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def w(x):
        return int(round(x * width_scale))

    tiny = ROOT / "tests/fixtures/diffusion/sdxl-tiny"
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tiny / "tokenizer_2")
    torch.manual_seed(0)
    te1 = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower
        vocab_size=len(tokenizer), hidden_size=w(768), intermediate_size=w(3072), num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(  # OpenCLIP bigG's text tower
        vocab_size=len(tokenizer_2), hidden_size=w(1280), intermediate_size=w(5120), num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=w(1280),
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(  # stable-diffusion-xl-base-1.0's unet/config.json, widths scaled
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w(320), w(640), w(1280)),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=w(768) + w(1280), addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + w(1280),
    )
    vae = AutoencoderKL(  # SDXL's vae/config.json (full width: it is the same VAE at every size)
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=1024, scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler.from_pretrained(tiny / "scheduler")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def diffusers_child(args):
    """The whole-process side of diffusers: import, load the saved pipeline,
    sample, write PNGs (what `orchestrate generate` does in one process)."""
    from diffusers import DDIMScheduler, DiffusionPipeline
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.diffusers_child, torch_dtype=dtype).to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(args.images)]
    cfg = 5.0 if args.layout == "sdxl" else 7.5
    images = pipe("a photo of a cat", num_inference_steps=args.steps, guidance_scale=cfg, height=args.size,
                  width=args.size, num_images_per_prompt=args.images, generator=gens).images
    out = Path(args.child_out)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(out / f"{i}.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="sd15", choices=["sd15", "sdxl", "tiny"],
                    help="tiny: the sd-tiny fixture (a quick run of the machinery, not a figure)")
    ap.add_argument("--width-scale", type=float, default=0.5, help="sdxl: fraction of the real widths")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--bin", default=str(ROOT / "target/release/orchestrate"))
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternated (A B A B)")
    ap.add_argument("--warmup", type=int, default=1, choices=[0, 1], help="an untimed diffusers call first")
    ap.add_argument("--mode", default="both", choices=["sampling", "process", "both", "none"],
                    help="sampling: load excluded on both sides; process: whole processes, with peak memory")
    ap.add_argument("--levers", nargs="*", default=None, metavar="LEVER",
                    help="also time orchestrate's sampling with each lever on and off (alone: the generator's, "
                         "channels_last noise_on_device, and cudnn_benchmark on CUDA)")
    ap.add_argument("--json-out", help="rows for scripts/gpu-check")
    ap.add_argument("--pipeline-dir", help="sd15: where the random pipeline is saved, and reused when already there")
    ap.add_argument("--diffusers-child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.diffusers_child:
        return diffusers_child(args)
    default_levers = ["channels_last", "noise_on_device"] + (["cudnn_benchmark"] if args.device.startswith("cuda") else [])
    levers = default_levers if args.levers == [] else (args.levers or [])

    from transformers import CLIPTokenizer
    vocab = len(CLIPTokenizer.from_pretrained(ROOT / "tests/fixtures/diffusion/sd-tiny/tokenizer"))
    rows, raw = [], {}
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        if args.layout == "tiny":
            from diffusers import DDIMScheduler, StableDiffusionPipeline
            folder = ROOT / "tests/fixtures/diffusion/sd-tiny"
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            scheduler_name, cfg = "ddim", 7.5
        elif args.layout == "sdxl":
            folder = Path(tmp) / "sdxl-random"
            pipe = build_sdxl_pipeline(folder, args.width_scale)
            scheduler_name, cfg = "ddim", 5.0
            from diffusers import DDIMScheduler
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        elif args.pipeline_dir and (Path(args.pipeline_dir) / "model_index.json").exists():
            from diffusers import StableDiffusionPipeline
            folder = Path(args.pipeline_dir)  # saved by an earlier run: the same random weights (seed 0)
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
            scheduler_name, cfg = "ddim", 7.5
        else:
            folder = Path(args.pipeline_dir or Path(tmp) / "sd15-random")
            pipe = build_pipeline(folder, vocab)
            scheduler_name, cfg = "ddim", 7.5
        pipe.set_progress_bar_config(disable=True)
        prompt, seed = "a photo of a cat", 0
        config = ({"sdxl": f"SDXL layout at {args.width_scale} of its widths", "sd15": "SD 1.5 layout",
                   "tiny": "sd-tiny fixture"}[args.layout]
                  + f", random weights, {args.size}x{args.size}, {args.steps} DDIM steps, CFG {cfg}, "
                  f"{args.images} images in one batch, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}")
        print(config, flush=True)

        cmd = [args.bin, "generate", "--model", str(folder), "--prompt", prompt, "--seed", str(seed),
               "--steps", str(args.steps), "--guidance-scale", str(cfg), "--height", str(args.size),
               "--width", str(args.size), "--scheduler", scheduler_name, "--images-per-prompt", str(args.images),
               "--batch-size", str(args.images), "--device", args.device, "--dtype", args.dtype]

        def ours(lever_env=None, out="ours"):
            """(sampling seconds as the binary reports it, wall seconds, peak GiB)."""
            env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1", **(lever_env or {})}
            shutil.rmtree(Path(tmp) / out, ignore_errors=True)
            rc, _, err, wall, peak = run_child(cmd + ["--out", str(Path(tmp) / out)], env=env)
            m = re.search(r"sampled \d+ images in ([0-9.]+) s", err)
            if rc != 0 or not m:
                raise SystemExit(f"orchestrate generate failed or printed no timing line:\n{err}")
            return float(m.group(1)), wall, peak

        def theirs_sampling():
            gens = [torch.Generator().manual_seed(seed + i) for i in range(args.images)]
            t = time.perf_counter()
            pipe(prompt, num_inference_steps=args.steps, guidance_scale=cfg, height=args.size, width=args.size,
                 num_images_per_prompt=args.images, generator=gens, output_type="np")
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t

        def theirs_process():
            child = [sys.executable, __file__, "--diffusers-child", str(folder), "--child-out", str(Path(tmp) / "theirs"),
                     "--layout", args.layout, "--size", str(args.size), "--steps", str(args.steps),
                     "--images", str(args.images), "--device", args.device, "--dtype", args.dtype]
            rc, _, err, wall, peak = run_child(child, env=dict(os.environ))
            if rc != 0:
                raise SystemExit(f"diffusers child failed:\n{err}")
            return wall, peak

        if args.mode in ("sampling", "both"):
            pipe = pipe.to(args.device, torch_dtype)
            for _ in range(args.warmup):
                theirs_sampling()
            a, b = [], []
            for _ in range(args.repeats):  # A B A B: drift in machine load hits both sides alike
                a.append(theirs_sampling() / args.images)
                b.append(ours()[0] / args.images)
            raw["sampling"] = {"diffusers_s_per_image": a, "orchestrate_s_per_image": b}
            ratio = min(b) / min(a)
            print(f"sampling only: diffusers {min(a):.3f} s/image, orchestrate {min(b):.3f} s/image, ratio {ratio:.3f}", flush=True)
            rows.append({"what": f"generate ({args.layout}) sampling s/image (ours/diffusers, target <= 0.9)",
                         "figure": f"{min(b):.3f} / {min(a):.3f} = {ratio:.3f}x"})
            pipe = pipe.to("cpu")  # the process runs below load their own copies
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        if args.mode in ("process", "both"):
            a, b, pa, pb = [], [], [], []
            for _ in range(args.repeats):
                w, p = theirs_process()
                a.append(w)
                pa.append(p)
                _, w, p = ours()
                b.append(w)
                pb.append(p)
            raw["process"] = {"diffusers_wall_s": a, "orchestrate_wall_s": b, "diffusers_peak_gib": pa,
                              "orchestrate_peak_gib": pb}
            ratio = min(b) / min(a)
            print(f"whole process: diffusers {min(a):.2f} s, orchestrate {min(b):.2f} s, ratio {ratio:.3f}; "
                  f"peak host memory diffusers {max(pa):.2f} GiB, orchestrate {max(pb):.2f} GiB", flush=True)
            rows.append({"what": f"generate ({args.layout}) whole process s (ours/diffusers, target <= 0.9)",
                         "figure": f"{min(b):.2f} / {min(a):.2f} = {ratio:.3f}x"})
            rows.append({"what": f"generate ({args.layout}) peak host memory GiB (ours vs diffusers)",
                         "figure": f"{max(pb):.2f} vs {max(pa):.2f}"})
        for lever in levers:
            var = LEVERS[lever]
            on, off = [], []
            for _ in range(args.repeats):  # on off on off
                on.append(ours({var: "1"})[0] / args.images)
                off.append(ours({var: "0"})[0] / args.images)
            raw[f"lever_{lever}"] = {"on_s_per_image": on, "off_s_per_image": off}
            ratio = min(on) / min(off)
            print(f"lever {lever} ({var}): on {min(on):.3f} s/image, off {min(off):.3f} s/image, on/off {ratio:.3f}", flush=True)
            rows.append({"what": f"lever {lever} generate ({args.layout}) sampling s/image on/off", "figure": f"{min(on):.3f} / {min(off):.3f} = {ratio:.3f}x"})
    print(json.dumps({"config": config, **raw}, indent=1))
    write_rows(args.json_out, rows, config=config, raw=raw)


if __name__ == "__main__":
    sys.exit(main())
