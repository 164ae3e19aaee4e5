"""Benchmark: orchestrate's ImageReward against ImageReward's own model code in
PyTorch eager, at the published size (BLIP ViT-L/16 at 224 px + BERT-base with
cross-attention + the MLP head), random weights, one run. Not a test: run by hand,

    /root/.cache/orchestrate/torch-2.11.0/bin/python scripts/bench/imagereward.py [--batch 8] [--reps 2]

Builds the model from the vendored reference (tests/fixtures/imagereward/reference,
with make_fixtures.py's shims), saves it with torch.save as `ImageReward.pt` +
`med_config.json` (the published med_config) in a temporary folder, times
`ImageReward.score_gard` under no_grad, then runs the ignored test
`bench_real_size` of tests/imagereward.rs on the same files, which loads them
through the restricted unpickler and times `ImageReward::score`. Only the
forward call is timed on either side; both use all cores.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "imagereward")
MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 768, "add_cross_attention": True,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, FIX)
    import make_fixtures  # noqa: E402

    make_fixtures.shims()
    sys.path.insert(0, os.path.join(FIX, "reference"))
    from ImageReward.ImageReward import MLP, ImageReward
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer
    make_fixtures.patch_bert(BertModel)

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="imagereward-bench-")
    med_path = os.path.join(tmp, "med_config.json")
    with open(med_path, "w") as f:
        json.dump(MED, f)
    blip = nn.Module()
    # create_vit('large', 224): as BLIP_Pretrain(vit='large') builds it.
    blip.visual_encoder = VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                            use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0.1)
    cfg = BertConfig.from_json_file(med_path)
    cfg.encoder_width = 1024
    blip.text_encoder = BertModel(config=cfg, add_pooling_layer=False)
    model = ImageReward.__new__(ImageReward)
    nn.Module.__init__(model)
    model.device, model.blip, model.mlp = "cpu", blip, MLP(768)
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    model.eval()
    torch.save(model.state_dict(), os.path.join(tmp, "ImageReward.pt"))

    b = args.batch
    px = torch.randn(b, 3, 224, 224)
    ids = torch.randint(1000, 30000, (b, 35))
    ids[:, 0], ids[:, 20] = 101, 102
    ids[:, 21:] = 0
    mask = (ids != 0).long()
    torch.save({"px": px, "ids": ids, "mask": mask}, os.path.join(tmp, "inputs.pt"))
    from safetensors.torch import save_file
    save_file({"pixel_values": px, "input_ids": ids, "attention_mask": mask}, os.path.join(tmp, "inputs.safetensors"))
    with torch.no_grad():
        ref = model.score_gard(ids, mask, px).flatten()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.reps):
            model.score_gard(ids, mask, px)
        py = b * args.reps / (time.perf_counter() - t0)
    save_file({"scores": ref.contiguous()}, os.path.join(tmp, "scores.safetensors"))
    del model
    print(f"PyTorch eager: {py:.2f} images/s (batch {b}, {torch.get_num_threads()} threads)", flush=True)
    out = subprocess.run(
        ["cargo", "test", "--test", "imagereward", "--", "--ignored", "--nocapture", "bench_real_size"],
        cwd=ROOT, env={**os.environ, "IMAGEREWARD_BENCH_DIR": tmp, "IMAGEREWARD_BENCH_REPS": str(args.reps)},
        capture_output=True, text=True,
    )
    line = [l for l in out.stdout.splitlines() if l.startswith("orchestrate:")]
    if not line:
        print(out.stdout[-3000:], out.stderr[-3000:])
        sys.exit(1)
    print(line[0])
    ours = float(line[0].split()[1])
    print(f"ratio orchestrate / PyTorch: {ours / py:.2f}")
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
