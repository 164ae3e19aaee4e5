"""Benchmark: orchestrate's RAHF against the same network in PyTorch eager, at the
published size (ViT-L/16-384 + T5-base, multi-head, random weights), one run.

Prints images/s for both at each batch size and the ratio ours/theirs (> 1 means
orchestrate is faster). Not a test: run by hand,

    scripts/setup.sh --fixtures
    cargo build --release
    .venv/bin/python scripts/bench/rahf.py [--batches 1 8 32] [--reps 1] [--device cpu]

What is timed, on both sides, per batch: ViT, projection, the T5 encoder over
[image tokens ; prompt], both heatmap heads and the four score heads, and greedy
keyword decoding (100 new tokens at most). The PyTorch network is the fixture
script's statement of RAHF (tests/fixtures/rahf/make_fixtures.py, imported, not
copied) with the published head widths. It is saved with torch.save in the
published checkpoint's layout and converted with `orchestrate rahf import`;
orchestrate is timed by `orchestrate score`'s own per-batch log line, so process
start-up and model loading are not counted (nor, for PyTorch, is anything but
the forward call). Images are 384x384, so the resize both sides would do is the
identity. The tokenizer is the tiny fixture one (T5-base's vocabulary size is
kept for the model; the tokenizer does not change the cost).

The PyTorch and orchestrate runs alternate, batch size by batch size, on the
same machine and thread count. A batch size whose estimated time (from the
previous one) exceeds --max-seconds per side is skipped and reported.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LEVERS, run_child, self_peak_gib, write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_SCRIPT = ROOT / "tests/fixtures/rahf/make_fixtures.py"

# google/vit-large-patch16-384's config.json values.
VIT_L16_384 = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    hidden_act="gelu", layer_norm_eps=1e-12, image_size=384, patch_size=16, num_channels=3, qkv_bias=True,
)
# t5-base's config.json values.
T5_BASE = dict(
    vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.0,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
PROMPT = "a woman holding a blue umbrella in the snow ."


def fixture_module(tiny=False):
    """The fixture script as a module, with the published head widths (`tiny`:
    the fixture's own, for quick runs of this script's machinery)."""
    spec = importlib.util.spec_from_file_location("rahf_fixtures", FIXTURE_SCRIPT)
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    if tiny:
        mf.TINY = True
        return mf
    mf.HEATMAP_CONV = (768, 384)
    mf.HEATMAP_DECONV = (768, 384, 384, 192)
    mf.HEATMAP_LAST = 192
    mf.SCORE_CONV = None  # d, d/2, d/4, d/8, d/16, d/64
    mf.SCORE_LINEAR = (512, 128)
    return mf


def build(mf, work: Path):
    """The PyTorch RAHF, and on disk: its checkpoint and the backbones' HF folders (configs only)."""
    from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    if getattr(mf, "TINY", False):  # the fixture backbones' configs
        fx = ROOT / "tests/fixtures/rahf"
        vit_cfg, t5_cfg = ViTConfig.from_pretrained(fx / "vit"), T5Config.from_pretrained(fx / "t5")
    else:
        vit_cfg, t5_cfg = ViTConfig(**VIT_L16_384), T5Config(**T5_BASE)
    size = vit_cfg.image_size
    vit = ViTModel(vit_cfg).eval()
    t5 = T5ForConditionalGeneration(t5_cfg).eval()
    t5.generation_config.max_length = None
    model = mf.Rahf(vit, t5, multi_head=True).eval()

    tok, _ = mf.build_tokenizer()
    vit_dir, t5_dir = work / "vit", work / "t5"
    vit_cfg.save_pretrained(vit_dir)
    ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(vit_dir)
    t5_cfg.save_pretrained(t5_dir)
    tok.save_pretrained(t5_dir)
    ckpt = work / "rahf_multi_head.pt"
    torch.save(mf.published_state_dict(model), ckpt)
    n = sum(p.numel() for p in model.parameters())
    print(f"PyTorch RAHF: {n / 1e6:.1f} M parameters, checkpoint {ckpt.stat().st_size / 2**30:.2f} GiB")
    return model, tok, ckpt, vit_dir, t5_dir


ANSI = re.compile(r"\x1b\[[0-9;]*m")
BATCH_LINE = re.compile(r"batch of (\d+) images in ([0-9.]+) s")


def run_orchestrate(binary, model_dir, images, batch, device, threads, lever_env=None):
    """Per-batch seconds from `orchestrate score`'s log, the JSON records, and
    the process's peak resident memory (GiB)."""
    env = dict(os.environ, RUST_LOG="orchestrate=debug", NO_COLOR="1", OMP_NUM_THREADS=str(threads), **(lever_env or {}))
    cmd = [str(binary), "score", "--rahf", str(model_dir), "--prompt", PROMPT, "--batch-size", str(batch),
           "--device", device, "--dtype", "fp32", *map(str, images)]
    rc, out, err, _, peak = run_child(cmd, env=env)
    if rc != 0:
        sys.exit(f"orchestrate score failed:\n{err}")
    times = [float(m.group(2)) for m in BATCH_LINE.finditer(ANSI.sub("", err)) if int(m.group(1)) == batch]
    return times, [json.loads(l) for l in out.splitlines()], peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=1, help="timed batches per batch size and side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warmup", type=int, default=1, choices=[0, 1],
                    help="untimed batches first on each side (0 saves time at large batches, where set-up costs are small)")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="skip a batch size estimated to take longer (per side)")
    ap.add_argument("--work", type=Path, default=ROOT / "target/bench-rahf", help="where the checkpoint and folders go")
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--levers", nargs="*", default=None, metavar="LEVER",
                    help="also time orchestrate with each lever on and off, alternated (default with the flag: vit_sdpa t5_sdpa)")
    ap.add_argument("--json-out", help="rows for scripts/gpu-check")
    ap.add_argument("--size", default="published", choices=["published", "tiny"],
                    help="tiny: the fixture RAHF's widths (a quick run of the machinery, not a figure)")
    args = ap.parse_args()
    levers = ["vit_sdpa", "t5_sdpa"] if args.levers == [] else (args.levers or [])
    binary = args.bin.resolve() if args.bin else next(
        (b for b in [ROOT / "target/release/orchestrate", ROOT / "target/debug/orchestrate"] if b.exists()), None
    )
    if binary is None:
        sys.exit("build orchestrate first: cargo build --release")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    mf = fixture_module(tiny=args.size == "tiny")
    torch.set_grad_enabled(False)  # the fixture module sets it too; keep it explicit
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model, tok, ckpt, vit_dir, t5_dir = build(mf, work)
    model = model.to(args.device)

    ours = work / "orchestrate_rahf"
    t0 = time.perf_counter()
    subprocess.run([str(binary), "rahf", "import", "--checkpoint", str(ckpt), "--vit", str(vit_dir),
                    "--t5", str(t5_dir), "--out", str(ours)], check=True)
    print(f"rahf import: {time.perf_counter() - t0:.1f} s")
    ckpt.unlink()  # 2.5 GB; the imported folder is what is timed

    from PIL import Image
    rng = np.random.default_rng(0)
    n_batches = args.reps + args.warmup
    n_max = max(args.batches) * n_batches
    imgs_dir = work / "images"
    imgs_dir.mkdir()
    side = model.vit.config.image_size
    arrays = [rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8) for _ in range(n_max)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(imgs_dir / f"{i:03d}.png")
        Image.fromarray(a).save(paths[-1])
    pixels = torch.stack([(torch.from_numpy(a).permute(2, 0, 1).float() / 255 - 0.5) / 0.5 for a in arrays])
    ids = torch.tensor([tok(PROMPT).input_ids])

    def theirs(batch, offset):
        px = pixels[offset:offset + batch].to(args.device)
        t = time.perf_counter()
        out = model(px, ids.expand(batch, -1).to(args.device))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    print(f"device {args.device}, {args.threads} threads, orchestrate {binary}")
    print(f"{'batch':>5} {'pytorch img/s':>14} {'orchestrate img/s':>18} {'ratio':>6}")
    per_image = None
    results, lever_rows = [], []
    for batch in args.batches:
        if per_image is not None and per_image * batch * n_batches > args.max_seconds:
            print(f"{batch:>5} skipped: about {per_image * batch * n_batches:.0f} s per side > --max-seconds {args.max_seconds:.0f}")
            continue
        # Warm-up batches on each side (one-time kernel set-up), then the timed ones.
        for _ in range(args.warmup):
            theirs(batch, 0)
        py = [theirs(batch, batch * (r + args.warmup))[0] for r in range(args.reps)]
        times, records, peak = run_orchestrate(binary, ours, paths[: batch * n_batches], batch, args.device, args.threads)
        if len(times) != n_batches:
            sys.exit(f"expected {n_batches} batch timings from orchestrate, got {times}")
        rs = times[args.warmup:]
        py_ips, rs_ips = batch / min(py), batch / min(rs)
        per_image = max(min(py), min(rs)) / batch
        print(f"{batch:>5} {py_ips:>14.3f} {rs_ips:>18.3f} {rs_ips / py_ips:>6.2f}   peak GiB: orchestrate {peak:.2f}, "
              f"this process (PyTorch, model build included) {self_peak_gib():.2f}", flush=True)
        results.append((batch, py_ips, rs_ips, peak, self_peak_gib()))
        for lever in levers:
            # on off on off: one `score` process per side and repeat, the warm-up batch in each.
            ips = {"1": [], "0": []}
            for _ in range(max(1, args.reps)):
                for v in ("1", "0"):
                    t, _, _ = run_orchestrate(binary, ours, paths[: batch * n_batches], batch, args.device,
                                              args.threads, {LEVERS[lever]: v})
                    ips[v].append(batch / min(t[args.warmup:]))
            on, off = max(ips["1"]), max(ips["0"])
            print(f"      lever {lever}: on {on:.3f} img/s, off {off:.3f} img/s, on/off {on / off:.3f}", flush=True)
            lever_rows.append({"what": f"lever {lever} rahf batch {batch} img/s on/off",
                               "figure": f"{on:.3f} / {off:.3f} = {on / off:.3f}x"})
        if batch == args.batches[0]:
            # Same network: the first image's scores agree.
            _, out = theirs(1, 0)
            ref = out["scores"][0].cpu().numpy()
            got = np.array([records[0]["scores"][k] for k in mf.SCORE_TYPES])
            print(f"      scores of image 0: pytorch {np.round(ref, 5).tolist()}, orchestrate {np.round(got, 5).tolist()}, "
                  f"max diff {np.abs(ref - got).max():.2e}")
    print(json.dumps({"device": args.device, "threads": args.threads,
                      "images_per_s": [{"batch": b, "pytorch": p, "orchestrate": o, "ratio": o / p} for b, p, o, _, _ in results]}))
    rows = [{"what": f"rahf ({args.size}) score batch {b} img/s (ours/PyTorch, target >= 1.1)", "figure": f"{o:.3f} / {p:.3f} = {o / p:.2f}x",
             "note": f"peak host GiB: ours {mo:.2f}, PyTorch process {mp:.2f} (model build included)"}
            for b, p, o, mo, mp in results]
    write_rows(args.json_out, rows + lever_rows, device=args.device, threads=args.threads)


if __name__ == "__main__":
    main()
