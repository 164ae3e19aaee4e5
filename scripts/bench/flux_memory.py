"""Host memory of FLUX.1-dev's transformer through orchestrate's loader, at
reduced depth, extrapolated to the real 19 double + 38 single blocks.

FLUX.1-dev's `transformer/config.json` (hidden 3072 = 24 heads x 128, joint
attention 4096, pooled 768, in 64, rope axes 16/56/56, guidance embedding)
with random weights, saved by diffusers in bfloat16 at three depths:
(1, 1), (2, 1) and (1, 2) double/single blocks. For each, the Rust example
`flux_memory` loads it in bfloat16 on the CPU (`Weights::load`,
`FluxTransformer2DModel::load`) and runs one forward pass. The differences
give the cost of one double and one single block; the rest is the fixed part.
Not a test (needs ~6 GB of RAM and ~4 GB of disk); run by hand:

    cargo build --example flux_memory
    .venv/bin/python scripts/bench/flux_memory.py [--image-tokens 256] [--text-tokens 512]
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

ROOT = Path(__file__).resolve().parents[2]
DEV = dict(patch_size=1, in_channels=64, out_channels=None, attention_head_dim=128, num_attention_heads=24,
           joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
REAL = (19, 38)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-tokens", type=int, default=256, help="packed image tokens (256: a 256x256 image)")
    ap.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (FluxPipeline's default 512)")
    ap.add_argument("--bin", default=str(ROOT / "target/debug/examples/flux_memory"))
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for depth in [(1, 1), (2, 1), (1, 2)]:
            torch.manual_seed(0)
            model = FluxTransformer2DModel(**DEV, num_layers=depth[0], num_single_layers=depth[1]).to(torch.bfloat16)
            params = sum(p.numel() for p in model.parameters())
            folder = Path(tmp) / f"d{depth[0]}s{depth[1]}"
            model.save_pretrained(folder)
            del model
            out = subprocess.run([a.bin, str(folder), str(a.image_tokens), str(a.text_tokens)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["params"] = params
            rows[depth] = r
            print(json.dumps(r))
            for f in folder.iterdir():
                f.unlink()
    base, d2, s2 = rows[(1, 1)], rows[(2, 1)], rows[(1, 2)]
    per_d = (d2["params"] - base["params"], d2["loaded_rss_mib"] - base["loaded_rss_mib"])
    per_s = (s2["params"] - base["params"], s2["loaded_rss_mib"] - base["loaded_rss_mib"])
    print(f"\nper double block: {per_d[0] / 1e6:.1f} M params, {per_d[1]:.0f} MiB resident")
    print(f"per single block: {per_s[0] / 1e6:.1f} M params, {per_s[1]:.0f} MiB resident")
    extra = lambda n: (REAL[0] - 1) * n[0] + (REAL[1] - 1) * n[1]
    full_params = base["params"] + extra((per_d[0], per_s[0]))
    loaded = base["loaded_rss_mib"] + extra((per_d[1], per_s[1]))
    print(f"19 + 38 blocks: {full_params / 1e9:.2f} B params ({full_params * 2 / 2**30:.1f} GiB in bfloat16); "
          f"resident after loading {loaded / 1024:.1f} GiB")
    # Weights::load reads tensor by tensor (positioned reads, converted and
    # stored as each comes), so loading peaks at the loaded weights plus about
    # one tensor, whatever the shard sizes.
    over = [r["load_peak_mib"] - r["loaded_rss_mib"] for r in rows.values()]
    print(f"load peak above the loaded weights: {min(over):.0f}-{max(over):.0f} MiB; "
          f"projected peak of loading the real transformer: {(loaded + max(over)) / 1024:.1f} GiB")
    act = [r["forward_peak_mib"] - r["loaded_rss_mib"] for r in rows.values()]
    print(f"forward at {a.image_tokens} + {a.text_tokens} tokens: {min(act):.0f}-{max(act):.0f} MiB above the weights "
          f"(depth-independent under no_grad); {base['forward_s']:.1f} s at (1, 1), "
          f"+{d2['forward_s'] - base['forward_s']:.1f} s per double, +{s2['forward_s'] - base['forward_s']:.1f} s per single block")


if __name__ == "__main__":
    main()
