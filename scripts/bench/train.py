"""Benchmark: orchestrate's RAHF training (`orchestrate rahf train`) against the same
training in PyTorch eager, on the same samples, one run.

Prints samples/s for both sides, the ratio orchestrate/PyTorch (> 1 means
orchestrate is faster), a first-step loss parity check, and (--size base) the
projected time of the paper's schedule (Supp. §9: 20,000 steps x 256 samples).
Not a test: run by hand, with the fixture venv,

    cargo build --release
    ~/.cache/orchestrate/torch-2.11.0/bin/python scripts/bench/train.py [--bin target/release/orchestrate]
        [--size tiny|base] [--steps N] [--batch-size B] [--micro-batch-size M] [--device cpu|cuda]

Models (same weights on both sides):
- tiny (default): the RAHF fixture (tests/fixtures/rahf: vit/, t5/, multi_head.pt,
  48 px images), converted with `orchestrate rahf import`; PyTorch loads the same
  state dict into the fixture script's `Rahf` (imported, not copied).
- base: ViT-L/16-384 + T5-base with the published head widths and random weights,
  built by scripts/bench/rahf.py's helpers (imported), saved with torch.save,
  converted with `orchestrate rahf import`.

Data: `orchestrate rahf synth` writes --train-size samples (RichHF-18K's format:
train.tfrecord with 512x512 PNG maps, images/*.png at the model's image size,
prompts.jsonl). The PyTorch side reads those same files: the TFRecord (framing and
tf.train.Example parsed here, in plain Python), the PNGs (PIL), the prompts.
Both sides see the same sample in the same position of every step: the PyTorch
side reproduces orchestrate's order (epoch e is a Fisher-Yates shuffle by
SplitMix64 Rng::derive(seed, 0x0da7a, e); src/rng.rs, src/rahf/train/trainer.rs
`Order`), so micro-batches hold the same samples too.

The step, on both sides: zero the gradients; per micro-batch: collate (pixels
normalised with the folder's mean/std, both maps resized to the heatmap head's
output by antialiased bilinear and clamped to [0, 1], scores, prompt tokens,
keyword targets); the ViT once over the micro-batch; per group of equal prompt
token lengths the T5 encoder over [image tokens; prompt], all heads, heatmap MSE
and score MSE (per-item means), and the keyword cross-entropy of the decoder
teacher-forced on [start] + target[:-1] over the prompt part of the encoder output
(target: the prompt's words, misaligned ones with `_0`, then </s>; per-item mean
over tokens); loss = sum over items of (weighted parts) / step size; backward
(gradients accumulate over micro-batches); clip the global norm to 1.0; AdamW
(beta 0.9/0.999, eps 1e-8, decay --weight-decay; PyTorch: torch.optim.AdamW,
orchestrate: its own with PyTorch's formula) at the warm-up + rsqrt learning rate.
No dropout on either side (the configs' rates are 0).

What is timed:
- orchestrate: the `samples_per_second` of each step in the run's log.jsonl, i.e.
  step size / wall time from waiting for the step's samples to the end of the
  optimizer update. Its loader thread reads the TFRecord and decodes PNGs for the
  next steps while the current one trains (2 steps ahead), so decoding counts
  only when the loader is the bottleneck. Process start-up, model loading, the
  end-of-run checkpoint and final/ folder are not timed (--eval-every 0, and
  dev has no samples, so there is no validation); the run's checkpoints/ and
  final/ are deleted afterwards (GBs at base size), log.jsonl is kept.
- PyTorch: wall time per step of everything listed above, collation from
  decoded arrays included (u8 image -> normalised float, u8 maps -> resized float,
  tokenization with the folder's tokenizer.json). Images and maps are decoded
  once, up front (not timed), which is at most what orchestrate's prefetching
  hides. On CUDA the step ends with a synchronize (the loss values read each
  micro-batch synchronize anyway, as orchestrate's logging does).
Both: the median samples/s over the steps after the first 3 (warm-up). The two
sides run one after the other on the same machine, orchestrate first (the
PyTorch model is moved to the device only after it has exited), with the same
thread count (OMP_NUM_THREADS for orchestrate, torch.set_num_threads here).

Precision: fp32 on CPU; on CUDA by default bf16: orchestrate runs forward and
backward on a bf16 copy of fp32 master weights; PyTorch uses
torch.autocast(bfloat16) over fp32 weights (which keeps norms and softmax in
fp32), the usual PyTorch way. Optimizer states and updates are fp32 on both.

Augmentation: off by default on both sides (identical work, identical numbers).
--augment turns on orchestrate's Supp. §9 augmentation (crop, rare colour
jitter + JPEG, rare grayscale; in its loader thread) and nothing on the PyTorch
side: it measures what augmentation costs orchestrate, not a like-for-like pair.

Parity check: the first step's loss (and its heatmap/score/keyword parts) from
orchestrate's log against PyTorch's, on the same batch without augmentation
(with --augment, from an extra 1-step orchestrate run with --no-augment). Relative
tolerance: 1e-3 in fp32, 3e-2 in bf16 (the two sides round differently there).
The largest relative difference of the per-step losses over the whole run is
printed too (informative: after the first update the runs drift apart at
rounding level). Exit status 1 when the parity check fails.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/fixtures/rahf"
RAHF_BENCH = ROOT / "scripts/bench/rahf.py"
WARMUP_STEPS = 3
# Supp. §9's schedule, for the projection.
PAPER_STEPS, PAPER_BATCH = 20_000, 256
IGNORE = -100


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------- orchestrate's sample order
M64 = (1 << 64) - 1


class SplitMix64:
    """src/rng.rs's Rng, the parts the trainer's shuffle uses."""

    def __init__(self, seed):
        self.state = seed & M64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    @staticmethod
    def derive(seed, a, b):
        x = SplitMix64(seed ^ 0x5851F42D4C957F2D).next_u64() ^ ((a * 0x9E3779B97F4A7C15) & M64)
        y = SplitMix64(x).next_u64() ^ ((b * 0xBF58476D1CE4E5B9) & M64)
        return SplitMix64(y)

    def below(self, n):
        return (self.next_u64() * n) >> 64

    def shuffle(self, v):
        for i in range(len(v) - 1, 0, -1):
            j = self.below(i + 1)
            v[i], v[j] = v[j], v[i]


def step_indices(seed, n, batch, step):
    """Sample indices of 0-based step `step`: positions step*batch.. of the endless
    stream in which epoch e is its own permutation (trainer.rs `Order`)."""
    perms = {}
    out = []
    for p in range(step * batch, (step + 1) * batch):
        e = p // n
        if e not in perms:
            perm = list(range(n))
            SplitMix64.derive(seed, 0x0DA7A, e).shuffle(perm)
            perms[e] = perm
        out.append(perms[e][p % n])
    return out


def learning_rate(base, warmup, t):
    """src/rahf/train/optim.rs learning_rate: linear warm-up, then base * sqrt(warmup / t)."""
    t = max(t, 1)
    if warmup == 0:
        return base / t**0.5
    return base * t / warmup if t <= warmup else base * (warmup / t) ** 0.5


# ------------------------------------------------- RichHF-format data, read here
def tfrecord_records(path):
    """Record payloads of a TFRecord file (u64 length, u32 CRC, data, u32 CRC); the
    CRCs are not checked: orchestrate checks the same file."""
    data = path.read_bytes()
    i, out = 0, []
    while i < len(data):
        (n,) = struct.unpack_from("<Q", data, i)
        out.append(data[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def _varint(buf, i):
    shift = v = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, i


def _fields(buf):
    """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wt} unsupported")
        yield num, wt, v


def parse_example(buf):
    """tf.train.Example -> {key: list of bytes / floats / ints}."""
    out = {}
    for num, _, features in _fields(buf):
        if num != 1:
            continue
        for fnum, _, entry in _fields(features):
            if fnum != 1:
                continue
            key, feature = None, b""
            for enum, _, v in _fields(entry):
                if enum == 1:
                    key = v.decode()
                elif enum == 2:
                    feature = v
            values = []
            for kind, _, lst in _fields(feature):
                for _, wt, v in _fields(lst):
                    if kind == 1:
                        values.append(v)
                    elif kind == 2:
                        values += list(struct.unpack(f"<{len(v) // 4}f", v)) if wt == 2 else [struct.unpack("<f", v)[0]]
                    elif kind == 3:
                        if wt == 2:
                            j = 0
                            while j < len(v):
                                x, j = _varint(v, j)
                                values.append(x)
                        else:
                            values.append(v)
            out[key] = values
    return out


SCORE_KEYS = ["artifact_score", "misalignment_score", "aesthetics_score", "overall_score"]
MAP_KEYS = ["artifact_map", "misalignment_map"]


def prompt_words(prompt):
    """src/richhf/sample.rs prompt_words: split on spaces and ,.?!":; , empties dropped."""
    return [w for w in re.split(r'[ ,.?!":;]', prompt) if w]


def read_split(data_dir):
    """The train split joined with its images and prompts, in TFRecord order, decoded."""
    import io

    from PIL import Image

    prompts = {}
    for line in (data_dir / "prompts.jsonl").read_text().splitlines():
        r = json.loads(line)
        prompts[Path(r["filename"]).stem] = (r["prompt"], data_dir / r["filename"])
    samples = []
    for rec in tfrecord_records(data_dir / "train.tfrecord"):
        f = parse_example(rec)
        uid = Path(f["filename"][0].decode()).stem
        prompt, image_path = prompts[uid]
        maps = np.stack([np.asarray(Image.open(io.BytesIO(f[k][0])).convert("L")) for k in MAP_KEYS])
        labels = [int(t) for t in f["prompt_misalignment_label"][0].decode().split()]
        samples.append(dict(
            image=np.asarray(Image.open(image_path).convert("RGB")),
            prompt=prompt,
            scores=np.array([f[k][0] for k in SCORE_KEYS], dtype=np.float32),
            maps=maps,  # 2 x 512 x 512 u8
            labels=labels,
        ))
    return samples


# ------------------------------------------------- the PyTorch side
class TorchTrainer:
    def __init__(self, mf, model, rahf_dir, samples, args, device):
        from tokenizers import Tokenizer

        self.mf, self.model, self.samples, self.args, self.device = mf, model, samples, args, device
        cfg = json.loads((rahf_dir / "config.json").read_text())
        self.image_size = cfg["image_size"]
        self.rescale = cfg["rescale_factor"]
        self.mean = torch.tensor(cfg["image_mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["image_std"], device=device).view(1, 3, 1, 1)
        grid = cfg["vit"]["image_size"] // cfg["vit"]["patch_size"]
        self.map_size = grid << len(cfg["heatmap_head"]["deconv_channels"])
        t5 = cfg["t5"]
        self.eos, self.start, self.pad = t5["eos_token_id"], t5["decoder_start_token_id"], t5["pad_token_id"]
        self.tok = Tokenizer.from_file(str(rahf_dir / "tokenizer.json"))
        dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        assert not dropouts, f"the PyTorch model has dropout {dropouts}; orchestrate has none"
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=args.weight_decay)
        self.bf16 = args.precision == "bf16"

    def encode(self, text):
        ids = self.tok.encode(text).ids
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]

    def collate(self, idx):
        ss = [self.samples[i] for i in idx]
        px = torch.from_numpy(np.stack([s["image"] for s in ss])).to(self.device).permute(0, 3, 1, 2).float()
        if px.shape[-1] != self.image_size or px.shape[-2] != self.image_size:
            px = F.interpolate(px, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        px = (px.round().clamp(0, 255) * self.rescale - self.mean) / self.std
        maps = torch.from_numpy(np.stack([s["maps"] for s in ss])).to(self.device).float() / 255.0
        if maps.shape[-1] != self.map_size or maps.shape[-2] != self.map_size:
            maps = F.interpolate(maps, size=(self.map_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            maps = maps.clamp(0, 1)
        scores = torch.from_numpy(np.stack([s["scores"] for s in ss])).to(self.device)
        tokens = [self.encode(s["prompt"]) for s in ss]
        kw_valid, kw_ids = [], []
        for s in ss:
            words = prompt_words(s["prompt"])
            mis = [l == 0 for l in s["labels"]] + [False] * len(words)
            kw_valid.append(len(words) == len(s["labels"]))
            kw_ids.append(self.encode(" ".join(w + "_0" if m else w for w, m in zip(words, mis))))
        return px, maps, scores, tokens, kw_valid, kw_ids

    def micro_batch_loss(self, idx, n):
        """Loss of micro-batch `idx` weighted 1/n (n = step size), and its parts' sums."""
        mf, model, a = self.mf, self.model, self.args
        px, maps, scores, tokens, kw_valid, kw_ids = self.collate(idx)
        dev_type = "cuda" if self.device.type == "cuda" else "cpu"
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=self.bf16):
            visual = model.visual_tokens(px)
            nv = visual.shape[1]
            groups = {}
            for i, t in enumerate(tokens):
                groups.setdefault(len(t), []).append(i)
            total = torch.zeros((), device=self.device)
            parts = [torch.zeros((), device=self.device) for _ in range(3)]
            kw_items = 0
            for _, g in sorted(groups.items()):
                sel = torch.tensor(g, device=self.device)
                ids = torch.tensor([tokens[i] for i in g], device=self.device)
                hidden = model.encode(visual[sel], ids)
                fm = model.feature_map(hidden, nv)
                pred_s = torch.stack([model.score_predictor[k](fm) for k in mf.SCORE_TYPES], 1)
                pred_h = torch.stack([model.heatmap_predictor[k](fm) for k in mf.HEATMAP_TYPES], 1)
                hm = (pred_h.float() - maps[sel]).square().mean(dim=(1, 2, 3)).sum()
                sc = (pred_s.float() - scores[sel]).square().mean(dim=1).sum()
                part = hm * a.heatmap_weight + sc * a.score_weight
                parts[0] = parts[0] + hm.detach()
                parts[1] = parts[1] + sc.detach()
                rows = [r for r, i in enumerate(g) if kw_valid[i]]
                if rows and a.keyword_weight != 0:
                    targets = [kw_ids[g[r]] for r in rows]
                    t = max(len(x) for x in targets)
                    inp = [[self.start] + x[:-1] + [self.pad] * (t - len(x)) for x in targets]
                    lab = [x + [IGNORE] * (t - len(x)) for x in targets]
                    inp, lab = torch.tensor(inp, device=self.device), torch.tensor(lab, device=self.device)
                    prompt_hidden = hidden[torch.tensor(rows, device=self.device), nv:]
                    logits = model.t5(encoder_outputs=(prompt_hidden,), decoder_input_ids=inp, use_cache=False).logits
                    per_tok = F.cross_entropy(logits.float().flatten(0, 1), lab.flatten(), ignore_index=IGNORE,
                                              reduction="none").view(len(rows), -1)
                    kw = (per_tok.sum(1) / (lab != IGNORE).sum(1).clamp_min(1)).sum()
                    parts[2] = parts[2] + kw.detach()
                    kw_items += len(rows)
                    part = part + kw * a.keyword_weight
                total = total + part / n
        return total, parts, kw_items

    def step(self, t, idx):
        """1-based step t over samples `idx`: its log entry (the same fields as orchestrate's)."""
        a = self.args
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        n = len(idx)
        loss, hm, sc, kw, kw_items = 0.0, 0.0, 0.0, 0.0, 0
        for k in range(0, n, a.micro_batch_size):
            total, parts, items = self.micro_batch_loss(idx[k:k + a.micro_batch_size], n)
            total.backward()
            loss += total.item()
            hm += parts[0].item()
            sc += parts[1].item()
            kw += parts[2].item()
            kw_items += items
        max_norm = a.max_grad_norm if a.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = learning_rate(a.lr, a.warmup, t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"step": t, "lr": lr, "loss": loss, "heatmap": hm / n, "score": sc / n,
                "keyword": kw / kw_items if kw_items else None, "grad_norm": grad_norm, "samples_per_second": n / dt}


# ------------------------------------------------- models
def tiny_model(mf, work, binary):
    """The fixture RAHF in PyTorch and the same weights imported into an orchestrate folder."""
    from transformers import T5ForConditionalGeneration, ViTModel

    vit = ViTModel.from_pretrained(FIXTURES / "vit")
    t5 = T5ForConditionalGeneration.from_pretrained(FIXTURES / "t5")
    model = mf.Rahf(vit, t5, multi_head=True)
    sd = torch.load(FIXTURES / "multi_head.pt", weights_only=True)
    target = mf.published_state_dict(model)  # shares storage with the parameters
    if set(sd) != set(target):
        sys.exit(f"multi_head.pt and the fixture Rahf differ in keys: {sorted(set(sd) ^ set(target))}")
    with torch.no_grad():
        for k, v in sd.items():
            target[k].copy_(v)
    ours = work / "rahf"
    subprocess.run([str(binary), "rahf", "import", "--checkpoint", str(FIXTURES / "multi_head.pt"), "--vit",
                    str(FIXTURES / "vit"), "--t5", str(FIXTURES / "t5"), "--out", str(ours)], check=True,
                   capture_output=True)
    return model, ours


def base_model(bench, mf, work, binary):
    """ViT-L/16-384 + T5-base, published head widths, random weights (scripts/bench/rahf.py's build)."""
    model, _, ckpt, vit_dir, t5_dir = bench.build(mf, work)
    ours = work / "rahf"
    subprocess.run([str(binary), "rahf", "import", "--checkpoint", str(ckpt), "--vit", str(vit_dir), "--t5",
                    str(t5_dir), "--out", str(ours)], check=True, capture_output=True)
    ckpt.unlink()  # GBs; the imported folder holds the weights now
    return model, ours


# ------------------------------------------------- orchestrate
def run_orchestrate(args, binary, rahf_dir, data_dir, out, steps, augment):
    """Trains; returns the log's per-step entries."""
    cmd = [str(binary), "rahf", "train", "--init", str(rahf_dir), "--data", str(data_dir), "--out", str(out),
           "--steps", str(steps), "--batch-size", str(args.batch_size),
           "--micro-batch-size", str(args.micro_batch_size),
           "--lr", str(args.lr), "--warmup", str(args.warmup), "--weight-decay", str(args.weight_decay),
           "--max-grad-norm", str(args.max_grad_norm), "--heatmap-weight", str(args.heatmap_weight),
           "--score-weight", str(args.score_weight), "--keyword-weight", str(args.keyword_weight),
           "--seed", str(args.seed), "--eval-every", "0", "--checkpoint-every", "0", "--keep-checkpoints", "1",
           "--device", args.device, "--precision", args.precision]
    if not augment:
        cmd.append("--no-augment")
    env = dict(os.environ, NO_COLOR="1", OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"orchestrate rahf train failed ({' '.join(cmd)}):\n{p.stderr[-5000:]}")
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if l.strip()]
    log = [e for e in log if "samples_per_second" in e]
    if len(log) != steps:
        sys.exit(f"expected {steps} step entries in {out / 'log.jsonl'}, found {len(log)}")
    print(f"orchestrate: {steps} step(s) in {time.perf_counter() - t0:.1f} s wall (process, import of the "
          f"folder, final checkpoint included)", flush=True)
    # The end-of-run checkpoint (weights + AdamW moments) and final/ are ~7 GB at
    # base size and not needed here.
    for d in ["checkpoints", "final"]:
        shutil.rmtree(out / d, ignore_errors=True)
    return log


def median_rate(log):
    timed = log[WARMUP_STEPS:] if len(log) > WARMUP_STEPS else log
    return statistics.median(e["samples_per_second"] for e in timed), len(timed)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="default: 30 (tiny), 13 (base)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: 32 (tiny), 8 (base)")
    ap.add_argument("--train-size", type=int, default=None,
                    help="synthetic training samples (default: 2 x --batch-size, so steps cross epochs)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--augment", action="store_true",
                    help="orchestrate trains with its augmentation (PyTorch side: none); parity from an extra run")
    ap.add_argument("--lr", type=float, default=0.015)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--heatmap-weight", type=float, default=1.0)
    ap.add_argument("--score-weight", type=float, default=1.0)
    ap.add_argument("--keyword-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="default: target/bench-train-SIZE")
    ap.add_argument("--bin", type=Path, default=None)
    args = ap.parse_args()
    tiny = args.size == "tiny"
    args.steps = args.steps or (30 if tiny else 13)
    args.micro_batch_size = min(args.micro_batch_size or (32 if tiny else 8), args.batch_size)
    args.train_size = args.train_size or 2 * args.batch_size
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    binary = args.bin.resolve() if args.bin else next(
        (b for b in [ROOT / "target/release/orchestrate", ROOT / "target/debug/orchestrate"] if b.exists()), None)
    if binary is None:
        sys.exit("build orchestrate first: cargo build --release")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    work = args.work or ROOT / f"target/bench-train-{args.size}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    # Model on both sides (the fixture module turns gradients off globally; back on).
    if tiny:
        mf = load_module("rahf_fixtures", FIXTURES / "make_fixtures.py")
        torch.set_grad_enabled(True)
        model, rahf_dir = tiny_model(mf, work, binary)
    else:
        bench = load_module("rahf_bench", RAHF_BENCH)
        mf = bench.fixture_module()
        torch.set_grad_enabled(True)
        model, rahf_dir = base_model(bench, mf, work, binary)
    image_size = json.loads((rahf_dir / "config.json").read_text())["image_size"]

    data_dir = work / "data"
    subprocess.run([str(binary), "rahf", "synth", "--out", str(data_dir), "--train", str(args.train_size),
                    "--dev", "0", "--test", "0", "--image-size", str(image_size), "--heatmap-size", "512",
                    "--seed", str(args.seed)], check=True, capture_output=True)
    samples = read_split(data_dir)
    assert len(samples) == args.train_size, (len(samples), args.train_size)
    print(f"size {args.size}: {image_size} px, {args.train_size} synthetic samples; steps {args.steps}, batch "
          f"{args.batch_size}, micro-batch {args.micro_batch_size}, {args.device} {args.precision}, "
          f"{args.threads} threads, augment {'orchestrate only' if args.augment else 'off'}; orchestrate {binary}",
          flush=True)

    ours = run_orchestrate(args, binary, rahf_dir, data_dir, work / "run", args.steps, args.augment)
    parity_ours = ours[0]
    if args.augment:
        parity_ours = run_orchestrate(args, binary, rahf_dir, data_dir, work / "run-parity", 1, False)[0]

    model = model.to(device)
    trainer = TorchTrainer(mf, model, rahf_dir, samples, args, device)
    theirs = []
    t0 = time.perf_counter()
    for s in range(args.steps):
        theirs.append(trainer.step(s + 1, step_indices(args.seed, args.train_size, args.batch_size, s)))
    print(f"pytorch: {args.steps} steps in {time.perf_counter() - t0:.1f} s wall", flush=True)
    with safe_open(str(rahf_dir / "model.safetensors"), "pt") as f:
        n_ours = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    n_theirs = sum(p.numel() for p in trainer.params if p.grad is not None)

    py_rate, n_timed = median_rate(theirs)
    rs_rate, _ = median_rate(ours)
    ratio = rs_rate / py_rate
    first = WARMUP_STEPS + 1 if args.steps > WARMUP_STEPS else 1
    print()
    print(f"trained parameters: pytorch {n_theirs / 1e6:.3f} M (with a gradient), orchestrate {n_ours / 1e6:.3f} M")
    print(f"median samples/s over steps {first}..{args.steps} ({n_timed} steps):")
    print(f"{'side':<12} {'samples/s':>10} {'s/step':>8} {'first loss':>11} {'last loss':>10}")
    for name, rate, log in [("pytorch", py_rate, theirs), ("orchestrate", rs_rate, ours)]:
        print(f"{name:<12} {rate:>10.3f} {args.batch_size / rate:>8.3f} {log[0]['loss']:>11.5f} "
              f"{log[-1]['loss']:>10.5f}")
    print(f"ratio orchestrate/pytorch: {ratio:.2f}" + (" (orchestrate faster)" if ratio > 1 else " (pytorch faster)"))

    tol = 1e-3 if args.precision == "fp32" else 3e-2
    p0 = theirs[0]
    diffs = {k: rel(parity_ours[k], p0[k]) for k in ["loss", "heatmap", "score", "keyword"] if p0[k] is not None}
    parity_ok = all(d <= tol for d in diffs.values())
    print(f"parity, step 1 (same batch, no augmentation), relative tolerance {tol:g}: "
          + ("OK" if parity_ok else "FAILED"))
    for k, d in diffs.items():
        print(f"  {k:<8} pytorch {p0[k]:.6f}  orchestrate {parity_ours[k]:.6f}  rel diff {d:.1e}")
    print(f"  grad_norm pytorch {p0['grad_norm']:.6f}  orchestrate {parity_ours['grad_norm']:.6f}")
    drift = None
    if not args.augment:
        drift = max(rel(o["loss"], t["loss"]) for o, t in zip(ours, theirs))
        print(f"  largest per-step loss rel diff over the {args.steps} steps: {drift:.1e}")

    result = {"size": args.size, "device": args.device, "precision": args.precision, "threads": args.threads,
              "steps": args.steps, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
              "augment_orchestrate": args.augment, "samples_per_s": {"pytorch": py_rate, "orchestrate": rs_rate},
              "ratio": ratio, "parity": {"ok": parity_ok, "tolerance": tol, "pytorch_loss": p0["loss"],
                                         "orchestrate_loss": parity_ours["loss"], "rel_diff": diffs["loss"],
                                         "max_step_rel_diff": drift}}
    if not tiny:
        hours = {k: PAPER_STEPS * PAPER_BATCH / v / 3600 for k, v in result["samples_per_s"].items()}
        print(f"paper schedule ({PAPER_STEPS} steps x {PAPER_BATCH} samples) at these rates: "
              f"pytorch {hours['pytorch']:.1f} h, orchestrate {hours['orchestrate']:.1f} h")
        result["paper_schedule_hours"] = hours
    print(json.dumps(result))
    if not parity_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
