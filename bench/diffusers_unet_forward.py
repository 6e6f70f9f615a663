#!/usr/bin/env python3
"""diffusers' UNet2DModel forward pass on a model folder, timed: the Python side of the U-Net
speed comparison (`cargo run --release --example diffusers_sample -- forward ...`). Needs
`pip install torch diffusers`.

    python3 bench/diffusers_unet_forward.py DIR --batch 16 --threads 2

loads DIR (a model folder, or a pipeline folder's unet/) with `UNet2DModel.from_pretrained`,
runs one untimed warm-up call on a seeded batch at t = 500 under `torch.no_grad()`, then
times --reps calls. Prints one JSON object: {"impl", "what", "seconds" (median),
"all_seconds", "batch", "threads", "parameters", "torch_version"}.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from diffusers import UNet2DModel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sub = "unet" if os.path.isdir(os.path.join(args.dir, "unet")) else None
    model = UNet2DModel.from_pretrained(args.dir, subfolder=sub).eval()
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(args.batch, c, s, s, generator=torch.Generator().manual_seed(1))
    t = torch.full((args.batch,), 500.0)
    times = []
    with torch.no_grad():
        model(x, t)
        for _ in range(args.reps):
            start = time.perf_counter()
            model(x, t)
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "impl": "diffusers", "what": "unet_forward", "seconds": statistics.median(times), "all_seconds": times,
        "batch": args.batch, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "torch_version": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
