"""Benchmark: `orchestrate generate` against diffusers' FluxPipeline on a
FLUX.1-dev-layout pipeline at reduced depth, same random weights, same
settings, same machine, one run (A B A B over --repeats).

The transformer has FLUX.1-dev's widths (24 heads x 128, joint attention 4096,
pooled 768, rope axes 16/56/56, guidance embedding) with `--double` double and
`--single` single blocks (real: 19 and 38); the VAE is FLUX's (16 latent
channels, 128/256/512/512, shift and scaling factors); CLIP-L's text encoder
at its real size; T5 at T5-XXL's width (4096, 64 heads, d_ff 10240,
gated-gelu) with `--t5-layers` layers (real: 24). Tokenizers: the tiny
fixture ones (the vocabulary does not change the cost); T5 sequences are
`max_sequence_length` = 512 tokens as in FluxPipeline.

Prints seconds per image for sampling only (prompt encoding, denoising,
decoding; loading excluded on both sides: orchestrate's own `sampled N images
in S s` line, diffusers' pipeline call timed in-process) and the ratio
ours/theirs (< 1: orchestrate is faster). Not a test: run by hand,

    cargo build --release
    .venv/bin/python scripts/bench/flux.py [--bin target/release/orchestrate] [--size 512] [--steps 4]
        [--double 1] [--single 1] [--t5-layers 1] [--repeats 2] [--device cpu] [--dtype fp32]
"""
import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/flux/flux-tiny-dev"


def build(folder: Path, args):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    if (folder / "model_index.json").is_file():
        return
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56],
    )
    vae = AutoencoderKL(  # FLUX.1's vae/config.json
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    )
    tokenizer = CLIPTokenizer.from_pretrained(FIX / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP-L, with the tiny vocabulary
        vocab_size=tokenizer.vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    tokenizer_2 = T5TokenizerFast.from_pretrained(FIX / "tokenizer_2")
    text_encoder_2 = T5EncoderModel(T5Config(  # T5-XXL's width, fewer layers
        vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=args.t5_layers, num_heads=64,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        tie_word_embeddings=False,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(FIX / "scheduler")
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release/orchestrate"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--t5-layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    folder = Path(tempfile.gettempdir()) / f"orchestrate-bench-flux-d{args.double}s{args.single}t{args.t5_layers}"
    build(folder, args)

    from diffusers import FluxPipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True).to(args.device)
    prompt, seed, guidance = "a photo of a cat", 0, 3.5
    cmd = [args.bin, "generate", "--model", str(folder), "--prompt", prompt, "--seed", str(seed), "--steps",
           str(args.steps), "--guidance-scale", str(guidance), "--height", str(args.size), "--width", str(args.size),
           "--device", args.device, "--dtype", args.dtype]
    print(f"FLUX.1-dev layout, {args.double} double + {args.single} single blocks, T5-XXL width x {args.t5_layers} "
          f"layer(s), random weights, {args.size}x{args.size}, {args.steps} steps, guidance {guidance}, "
          f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}", flush=True)

    def ours():
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
            p = subprocess.run(cmd + ["--out", out], env=env, capture_output=True, text=True)
            m = re.search(r"sampled \d+ images? in ([0-9.]+) s", p.stderr + p.stdout)
            if p.returncode != 0 or not m:
                raise SystemExit(f"orchestrate generate failed or printed no timing line:\n{p.stderr}")
            return float(m.group(1))

    def theirs():
        t = time.perf_counter()
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=guidance, height=args.size, width=args.size,
             generator=torch.Generator().manual_seed(seed), output_type="np")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    a, b = [], []
    for _ in range(args.repeats):  # A B A B
        a.append(theirs())
        b.append(ours())
        print(f"diffusers {a[-1]:.2f} s, orchestrate {b[-1]:.2f} s", flush=True)
    print(f"sampling only, 1 image: diffusers {min(a):.2f} s, orchestrate {min(b):.2f} s, "
          f"ratio ours/theirs {min(b) / min(a):.3f}")


if __name__ == "__main__":
    main()
