#!/usr/bin/env python3
"""Times the PyTorch reference U-Net (bench/torch_reference.py, same network from the same
config) like `examples/unet_step.rs` times ours: per iteration both wall time and process CPU time
(user + system, all threads; OpenMP threads wait passively, so waiting is not counted as work).

  train  : zero_grad + forward + MSE + backward + AdamW step (lr 1e-4, no weight decay)
  sample : one no-grad forward pass

Prints one JSON object: {"workload", "batch", "threads", "median_ms", "times_ms",
"median_cpu_ms", "cpu_ms", "params", "peak_rss_mib", "torch_version"}.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import UNet, peak_rss_mib, reset_peak_rss  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workload", choices=["train", "sample"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.config) as f:
        config = json.load(f)
    model = UNet(config)
    c = config.get("in_channels", 3)
    s = config.get("sample_size", 32)
    s = s if isinstance(s, int) else s[0]
    x = torch.randn(args.batch, c, s, s)
    t = torch.randint(0, 1000, (args.batch,)).float()
    if args.workload == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        target = torch.randn_like(x)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x, t), target)
            loss.backward()
            opt.step()

    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x, t)

    reset_peak_rss()
    for _ in range(args.warmup):
        step()
    wall, cpu = [], []
    for _ in range(args.iters):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    print(json.dumps({
        "workload": args.workload, "batch": args.batch, "threads": args.threads,
        "median_ms": statistics.median(wall), "times_ms": wall,
        "median_cpu_ms": statistics.median(cpu), "cpu_ms": cpu,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_mib": peak_rss_mib(), "torch_version": torch.__version__,
    }))


if __name__ == "__main__":
    sys.exit(main())
