"""Benchmark: orchestrate's CLIP-family scorer models against their reference
code in PyTorch eager, at the published sizes with random weights, on the CPU.

Prints images/s for both sides and the ratio ours/theirs (> 1: orchestrate is
faster). Not a test: run by hand,

    scripts/setup.sh --fixtures
    cargo build --release --example scorer_bench   (or a debug build: the work is libtorch's)
    .venv/bin/python scripts/bench/scorers.py [--batch 8] [--reps 2] [--only hps pickscore]

Scorers and sizes (what users download):
  clipscore  openai/clip-vit-large-patch14 (CLIPModel ViT-L/14, 224)   torchmetrics' formula
  pickscore  PickScore_v1 (CLIPModel ViT-H-14, 224)                   PickScore README's formula
  aesthetic  CLIP ViT-L/14 image tower + the 768-wide MLP             simple_inference.py
  hps        open_clip ViT-H-14 (HPS_v2.1_compressed.pt layout)       HPSv2's score()

Each model is built with random weights and timed in PyTorch under no_grad
(best of --reps after one warm-up batch, forward from pixel_values and token
ids only), then saved in its users' format (in float16, to halve the scratch
space: 2 GB for a ViT-H model; both sides compute in float32) to a scratch
folder (--work, default /dev/shm when it exists; removed afterwards), freed,
and timed by the scorer_bench example on the same files, machine and thread
count.
"""
import argparse
import gc
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def fixture_module(name):
    """tests/fixtures/<name>/make_fixtures.py as a module (imported, not copied)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_fixtures", ROOT / "tests/fixtures" / name / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    spec.loader.exec_module(module)  # fixture scripts may pin one thread at import
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    return module

PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, 4k"

VIT_L_14 = dict(  # openai/clip-vit-large-patch14
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, hidden_act="quick_gelu"),
    projection_dim=768,
)
VIT_H_14 = dict(  # yuvalkirstain/PickScore_v1, laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)


def best_time(fn, reps):
    with torch.no_grad():
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def hf_clip(cfg):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(**cfg)).eval()


def save_hf_clip(model, work):
    """The CLIPModel as a transformers folder (float16), with a CLIP tokenizer."""
    diffusion = fixture_module("diffusion")
    folder = work / "clip"
    model.half().save_pretrained(folder)
    diffusion.write_tokenizer(str(work / "tok"), diffusion.learn_merges([PROMPT], 20), "<|endoftext|>", False)
    for f in (work / "tok").iterdir():
        shutil.move(str(f), folder / f.name)
    return folder


def torch_side(name, work, batch, reps):
    """Times the scorer in PyTorch, then saves it for the Rust side; returns
    (seconds, the scorer_bench arguments)."""
    from transformers import CLIPTokenizer

    pv = torch.randn(batch, 3, 224, 224)
    prompts = [PROMPT] * batch
    if name in ("clipscore", "pickscore", "aesthetic"):
        model = hf_clip(VIT_H_14 if name == "pickscore" else VIT_L_14)
        tok_dir = work / "tok0"
        diffusion = fixture_module("diffusion")
        diffusion.write_tokenizer(str(tok_dir), diffusion.learn_merges([PROMPT], 20), "<|endoftext|>", False)
        ids = CLIPTokenizer.from_pretrained(tok_dir)(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        if name == "aesthetic":
            mlp = fixture_module("scorers").MLP(768).eval()  # the predictor's class

            def run():
                e = model.get_image_features(pv).pooler_output
                return mlp(e / e.norm(dim=-1, keepdim=True))

        else:

            def run():
                img = model.get_image_features(pv).pooler_output
                txt = model.get_text_features(**ids).pooler_output
                img = img / img.norm(p=2, dim=-1, keepdim=True)
                txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
                cos = (img * txt).sum(-1)
                return torch.clamp(100 * cos, min=0) if name == "clipscore" else model.logit_scale.exp() * cos

        seconds = best_time(run, reps)
        folder = save_hf_clip(model, work)
        if name == "aesthetic":
            torch.save(mlp.state_dict(), work / "mlp.pth")
            return seconds, [str(folder), str(work / "mlp.pth")]
        return seconds, [str(folder)]
    if name == "hps":
        import open_clip

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-H-14", pretrained=None, output_dict=True).eval()
        text = open_clip.get_tokenizer("ViT-H-14")(prompts)

        def run():
            o = model(pv, text)
            return torch.diagonal(o["image_features"] @ o["text_features"].T)

        seconds = best_time(run, reps)
        torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, work / "hps.pt")
        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        return seconds, [str(work / "hps.pt"), str(bpe)]
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=["clipscore", "pickscore", "aesthetic", "hps"])
    release = ROOT / "target/release/examples/scorer_bench"
    ap.add_argument("--bin", default=str(release if release.exists() else ROOT / "target/debug/examples/scorer_bench"))
    ap.add_argument("--work", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    rows = []
    for name in args.only:
        work = Path(tempfile.mkdtemp(prefix=f"scorer-bench-{name}-", dir=args.work))
        try:
            theirs, rust_args = torch_side(name, work, args.batch, args.reps)
            gc.collect()  # the PyTorch model is gone before orchestrate loads its copy
            out = subprocess.run(
                [args.bin, name, *rust_args, str(args.batch), str(args.reps)],
                check=True, capture_output=True, text=True,
            ).stdout
            ours = json.loads(out.strip().splitlines()[-1])["seconds"]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = dict(scorer=name, batch=args.batch, threads=threads,
                   torch_images_per_s=args.batch / theirs, ours_images_per_s=args.batch / ours, ratio=theirs / ours)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'scorer':<10} {'torch img/s':>12} {'ours img/s':>11} {'ours/torch':>10}   (CPU, {threads} threads, batch {args.batch})")
    for r in rows:
        print(f"{r['scorer']:<10} {r['torch_images_per_s']:>12.3f} {r['ours_images_per_s']:>11.3f} {r['ratio']:>10.2f}")


if __name__ == "__main__":
    main()
