"""Benchmark: `orchestrate generate` against diffusers' StableDiffusionPipeline
(`--layout sd15`, SD 1.5's sizes) or StableDiffusionXLPipeline (`--layout sdxl`:
SDXL's real block layout — three levels, transformer depths 1/2/10, two text
encoders of 12 and 32 layers, text_time conditioning — at half width), same
random weights, same settings, same machine, one run.

Prints seconds per image for both and the ratio ours/theirs (target <= 1.0:
the same libtorch kernels run underneath). Not a test: run by hand,

    scripts/setup.sh --fixtures
    cargo build --release
    .venv/bin/python scripts/bench/generate.py [--layout sd15|sdxl] [--size 256] [--steps 10] [--device cpu]

The pipeline has SD 1.5's UNet/VAE/text-encoder configs with random weights and
the tiny fixture tokenizer (the vocabulary does not change the cost).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--width-scale", type=float, default=0.5, help="sdxl: fraction of the real widths")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--bin", default=str(ROOT / "target/release/orchestrate"))
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternated")
    args = ap.parse_args()

    from transformers import CLIPTokenizer
    vocab = len(CLIPTokenizer.from_pretrained(ROOT / "tests/fixtures/diffusion/sd-tiny/tokenizer"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.layout == "sdxl":
            folder = Path(tmp) / "sdxl-random"
            pipe = build_sdxl_pipeline(folder, args.width_scale)
            scheduler_name, cfg = "ddim", 5.0
            from diffusers import DDIMScheduler
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        else:
            folder = Path(tmp) / "sd15-random"
            pipe = build_pipeline(folder, vocab)
            scheduler_name, cfg = "ddim", 7.5
        dtype = torch.float16 if args.dtype == "fp16" else torch.float32
        pipe = pipe.to(args.device, dtype)
        prompt, seed = "a photo of a cat", 0

        def theirs():
            gens = [torch.Generator().manual_seed(seed + i) for i in range(args.images)]
            pipe(prompt, num_inference_steps=args.steps, guidance_scale=cfg, height=args.size, width=args.size,
                 num_images_per_prompt=args.images, generator=gens, output_type="np")
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        cmd = [args.bin, "generate", "--model", str(folder), "--prompt", prompt, "--seed", str(seed),
               "--steps", str(args.steps), "--guidance-scale", str(cfg), "--height", str(args.size),
               "--width", str(args.size), "--scheduler", scheduler_name, "--images-per-prompt", str(args.images),
               "--batch-size", str(args.images), "--device", args.device, "--dtype", args.dtype,
               "--out", str(Path(tmp) / "ours")]

        def ours():
            # Sampling time as the binary reports it, so both sides exclude
            # model loading and process start-up.
            r = subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "RUST_LOG": "info"})
            m = re.search(r"sampled \d+ images in ([0-9.]+) s", r.stderr)
            if not m:
                raise SystemExit(f"no timing line in orchestrate's output:\n{r.stderr}")
            return float(m.group(1))

        theirs()  # warm-up (allocator, thread pools)
        results = {}
        # A B A B: alternate so drift in machine load hits both sides alike.
        for name, fn in [("diffusers", theirs), ("orchestrate", ours)] * args.repeats:
            t0 = time.perf_counter()
            reported = fn()
            elapsed = reported if reported is not None else time.perf_counter() - t0
            results.setdefault(name, []).append(elapsed / args.images)
        a, b = min(results["orchestrate"]), min(results["diffusers"])
        print(json.dumps({
            "config": (f"SDXL layout at {args.width_scale} of its widths" if args.layout == "sdxl" else "SD 1.5 sizes")
                      + f", random weights, {args.size}x{args.size}, {args.steps} DDIM steps, CFG {cfg}, "
                      f"{args.images} images per batch, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}",
            "orchestrate_s_per_image": round(a, 3),
            "diffusers_s_per_image": round(b, 3),
            "ratio_ours_over_theirs": round(a / b, 3),
            "note": "both exclude model loading and process start-up; min over the runs, alternated",
        }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
