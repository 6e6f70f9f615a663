#!/usr/bin/env python3
"""PyTorch timings of the ops in `examples/ops_bench.rs`, same shapes, same thread count.

    python3 bench/torch_ops.py [--threads 2] [--reps 10] [--batch 64] [--only conv3x3] [--json]

Each workload: one warm-up, then `reps` timed runs; the median is reported in ms. "fwd" is the
op alone under `torch.no_grad()`; `--cpu` times process CPU time (all threads) instead of wall
time, with OpenMP's waiting threads passive; "fwd_bwd" is `y = op(inputs)`, `y.backward(r)` for a fixed
random output gradient `r`, with every input requiring grad, as the Rust benchmark does.
Only `pip install torch` is needed. Workload names match the Rust benchmark's.
"""
import argparse
import json
import os
import statistics
import sys
import time

if "--cpu" in sys.argv:
    # CPU time must not count OpenMP threads spinning while they wait for work.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402  (after the environment is set)
import torch.nn.functional as F  # noqa: E402

CLOCK = time.perf_counter


def workloads(n):
    w = []
    for c_in, c_out, hw, k, s, p in [
        (64, 64, 28, 3, 1, 1),
        (128, 128, 14, 3, 1, 1),
        (128, 128, 7, 3, 1, 1),
        (64, 64, 28, 3, 2, 1),
        (128, 64, 28, 1, 1, 0),
    ]:
        name = f"conv{k}x{k}{' s2' if s == 2 else ''} {c_in}->{c_out} @{hw}"
        w.append((name, [(n, c_in, hw, hw), (c_out, c_in, k, k), (c_out,)],
                  lambda t, s=s, p=p: F.conv2d(t[0], t[1], t[2], stride=s, padding=p)))
    for c, hw in [(64, 28), (128, 14)]:
        x = (n, c, hw, hw)
        w.append((f"group_norm(8) {c} @{hw}", [x, (c,), (c,)],
                  lambda t: F.group_norm(t[0], 8, t[1], t[2], 1e-5)))
        w.append((f"group_norm_silu(8) {c} @{hw}", [x, (c,), (c,)],
                  lambda t: F.silu(F.group_norm(t[0], 8, t[1], t[2], 1e-5))))
        w.append((f"gn_scale_shift_silu(8) {c} @{hw}", [x, (c,), (c,), (n, c), (n, c)],
                  lambda t: F.silu(F.group_norm(t[0], 8, t[1], t[2], 1e-5)
                                   * (1 + t[3][:, :, None, None]) + t[4][:, :, None, None])))
    w.append(("silu 64 @28", [(n, 64, 28, 28)], lambda t: F.silu(t[0])))
    w.append(("add_channel_bias 64 @28", [(n, 64, 28, 28), (n, 64)],
              lambda t: t[0] + t[1][:, :, None, None]))
    w.append(("upsample_nearest2x 64 @14", [(n, 64, 14, 14)],
              lambda t: F.interpolate(t[0], scale_factor=2, mode="nearest")))
    w.append(("avg_pool2x 64 @28", [(n, 64, 28, 28)], lambda t: F.avg_pool2d(t[0], 2)))
    def resblock(t):
        h = F.conv2d(F.silu(F.group_norm(t[0], 8, t[1], t[2], 1e-5)), t[3], t[4], padding=1)
        h = h + t[5][:, :, None, None]
        h = F.conv2d(F.silu(F.group_norm(h, 8, t[6], t[7], 1e-5)), t[8], t[9], padding=1)
        return t[0] + h

    for c, hw in [(64, 28), (128, 14)]:
        for name in [f"resblock {c} @{hw}", f"resblock fused {c} @{hw}"]:
            w.append((name,
                      [(n, c, hw, hw), (c,), (c,), (c, c, 3, 3), (c,), (n, c), (c,), (c,), (c, c, 3, 3), (c,)],
                      resblock))
    for l, d in [(49, 128), (196, 128)]:
        scale = 1.0 / d ** 0.5
        w.append((f"attention L{l} D{d}", [(n, l, d)] * 3,
                  lambda t, scale=scale: torch.softmax(t[0] @ t[1].transpose(1, 2) * scale, -1) @ t[2]))
    return w


def time_one(op, shapes, reps, stat):
    inputs = [torch.randn(s, requires_grad=True) for s in shapes]
    with torch.no_grad():
        r = torch.randn_like(op(inputs))
    fwd, both = [], []
    for i in range(reps + 1):
        t0 = CLOCK()
        with torch.no_grad():
            y = op(inputs)
        t1 = (CLOCK() - t0) * 1e3
        del y
        for x in inputs:
            x.grad = None
        t0 = CLOCK()
        y = op(inputs)
        y.backward(r)
        t2 = (CLOCK() - t0) * 1e3
        del y
        if i > 0:
            fwd.append(t1)
            both.append(t2)
    return stat(fwd), stat(both)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", default=None, help="run only workloads whose name contains this")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--min", action="store_true", help="report the fastest run, not the median")
    ap.add_argument("--cpu", action="store_true", help="time process CPU time instead of wall time")
    a = ap.parse_args()
    global CLOCK
    if a.cpu:
        CLOCK = time.process_time
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {}
    for name, shapes, op in workloads(a.batch):
        if a.only and a.only not in name:
            continue
        f, b = time_one(op, shapes, a.reps, min if a.min else statistics.median)
        out[name] = {"fwd_ms": f, "fwd_bwd_ms": b}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"torch {torch.__version__}: batch {a.batch}, {a.threads} threads, {'fastest' if a.min else 'median'} of {a.reps} runs (ms)")
        for name, v in out.items():
            print(f"{name:<32} fwd {v['fwd_ms']:9.2f}   fwd+bwd {v['fwd_bwd_ms']:9.2f}")


if __name__ == "__main__":
    main()
