"""Benchmark: `orchestrate finetune` (LoRA) against the training step of
diffusers' examples/text_to_image/train_text_to_image_lora.py with peft, on
the same pipeline, data and hyperparameters, same machine, one run, A B A B.

Prints training steps/s of both and the ratio ours/theirs (> 1: orchestrate is
faster). Steps only: model loading and the first (warm-up) step are excluded
on both sides (orchestrate's per-step `seconds` from log.jsonl; Python's
steps timed in-process). Not a test: run by hand with the fixture venv,

    cargo build --release
    .venv/bin/python scripts/bench/finetune.py [--bin target/release/orchestrate]
        [--layout tiny|mid] [--steps 20] [--batch-size 2] [--resolution 64] [--repeats 2]

Layouts (random weights): `tiny` is the fixture pipeline tests/fixtures/diffusion/sd-tiny;
`mid` has SD 1.5's block structure at a quarter of its width (UNet 80/160/320/320,
VAE 32/64/128/128, CLIP text encoder 6 layers of 384), saved once under
/tmp/orchestrate-bench-finetune-mid. The Python side is the script's step
without accelerate (one process, float32 on the CPU; `--device cuda` for GPUs):
peft's `inject_adapter_in_model` on to_q/to_k/to_v/to_out.0, VAE
`latent_dist.sample()`, DDPM noise at uniform timesteps, MSE on epsilon,
gradient-norm clipping at 1, AdamW, constant learning rate.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def mid_pipeline(folder: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(80, 160, 320, 320),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=384, attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=0.18215,
    )
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "tests/fixtures/diffusion/sd-tiny/tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=6, max_position_embeddings=77, hidden_act="quick_gelu",
    ))
    scheduler = DDIMScheduler.from_pretrained(ROOT / "tests/fixtures/diffusion/sd-tiny/scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def make_data(folder: Path, n: int, res: int):
    from PIL import Image

    (folder / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / "train" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing {i}"}))
    (folder / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return [np.asarray(Image.open(folder / "train" / f"{i}.png")) for i in range(n)]


def python_steps_per_s(model, images, args):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model

    device = torch.device(args.device)
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, local_files_only=True)
    vae, text_encoder, unet, tokenizer = pipe.vae.to(device), pipe.text_encoder.to(device), pipe.unet, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS), unet)
    unet.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    rng = np.random.default_rng(0)
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        idx = rng.choice(len(images), args.batch_size, replace=False)
        px = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).to(device)
        pixel_values = (px.float().div(255) - 0.5) / 0.5
        ids = tokenizer([f"a photo of thing {i}" for i in idx], max_length=tokenizer.model_max_length,
                        padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            states = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,), device=device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t0)
    return len(times) / sum(times)


def ours_steps_per_s(model, data, args):
    with tempfile.TemporaryDirectory() as out:
        run = Path(out) / "run"
        cmd = [args.bin, "finetune", "--model", str(model), "--data", str(data), "--out", str(run),
               "--steps", str(args.steps + 1), "--batch-size", str(args.batch_size),
               "--resolution", str(args.resolution), "--center-crop", "--checkpoint-every", "0",
               "--device", args.device, "--precision", "fp32"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        entries = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
        secs = [e["seconds"] for e in entries[1:]]
        return len(secs) / sum(secs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default=str(ROOT / "target/release/orchestrate"))
    p.add_argument("--layout", choices=["tiny", "mid"], default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None, help="default: 32 (tiny), 64 (mid)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    args.resolution = args.resolution or (32 if args.layout == "tiny" else 64)
    if args.layout == "tiny":
        model = ROOT / "tests/fixtures/diffusion/sd-tiny"
    else:
        model = mid_pipeline(Path(tempfile.gettempdir()) / "orchestrate-bench-finetune-mid")
    with tempfile.TemporaryDirectory() as d:
        images = make_data(Path(d), 8, args.resolution)
        ours, theirs = [], []
        for _ in range(args.repeats):  # A B A B
            ours.append(ours_steps_per_s(model, d, args))
            theirs.append(python_steps_per_s(model, images, args))
    o, t = float(np.median(ours)), float(np.median(theirs))
    print(json.dumps({
        "layout": args.layout, "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
        "device": args.device, "orchestrate_steps_per_s": ours, "diffusers_peft_steps_per_s": theirs,
        "ratio_ours_over_theirs": o / t,
    }, indent=1))


if __name__ == "__main__":
    sys.exit(main())
