#!/usr/bin/env python3
"""PyTorch reference for `diffuse bench --compare-torch`.

Builds the same U-Net as `diffuse` from the same config (the diffusers `UNet2DModel` config
format that `diffuse` presets are written in), in plain PyTorch (only `pip install torch` is
needed; the module and parameter names mirror diffusers' so the parameter count can be checked
against it), and times one workload:

  train  : forward + MSE loss + backward + AdamW step at --batch (default 64)
  sample : one no-grad forward pass at --batch (default 256)

after --warmup untimed iterations, reporting the median over --iters. Peak memory is the
process's resident-set high-water mark (VmHWM) measured from just before the first warm-up
iteration (reset through /proc/self/clear_refs where the kernel allows it).

Prints one JSON object: {"workload", "batch", "threads", "median_ms", "times_ms", "params",
"peak_rss_mib", "base_rss_mib" (VmRSS right after the reset: the interpreter, libtorch, the
model and its inputs), "torch_version"}. With --profile, --iters more steps run under
torch.profiler (CPU activities) after the timed ones, and "profile" lists every op's calls,
self CPU time and total CPU time per step (ms), largest self time first.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """diffusers.models.embeddings.get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.linear_1 = nn.Linear(cin, cout)
        self.linear_2 = nn.Linear(cout, cout)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout, temb, groups, eps, dropout, scale_shift, output_scale_factor=1.0):
        super().__init__()
        self.scale_shift = scale_shift
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout * 2 if scale_shift else cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time_emb_proj(F.silu(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """diffusers Attention as used by AttnDownBlock2D (residual, optional group norm)."""

    def __init__(self, c, head_dim, groups, eps, rescale_output_factor=1.0):
        super().__init__()
        self.heads = max(c // head_dim, 1)
        self.group_norm = nn.GroupNorm(groups, c, eps=eps) if groups else None
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])
        self.rescale = rescale_output_factor

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        h = h.view(b, c, hh * ww).transpose(1, 2)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        d = c // self.heads
        q, k, v = (z.view(b, -1, self.heads, d).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, hh * ww, c)
        o = self.to_out[0](o).transpose(1, 2).reshape(b, c, hh, ww)
        return (o + x) / self.rescale


class Downsample2D(nn.Module):
    def __init__(self, c, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cfg, cin, cout, temb, attn, add_down):
        super().__init__()
        g, eps, dr, ss = cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"], cfg["scale_shift"]
        n = cfg["layers_per_block"]
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, temb, g, eps, dr, ss) for i in range(n)]
        )
        hd = cfg["attention_head_dim"] or cout
        self.attentions = nn.ModuleList([Attention(cout, hd, g, eps) for _ in range(n)]) if attn else None
        self.downsamplers = nn.ModuleList([Downsample2D(cout, cfg["downsample_padding"])]) if add_down else None

    def forward(self, x, temb):
        states = []
        for i, r in enumerate(self.resnets):
            x = r(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    def __init__(self, cfg, cin, cout, prev, temb, attn, add_up):
        super().__init__()
        g, eps, dr, ss = cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"], cfg["scale_shift"]
        n = cfg["layers_per_block"] + 1
        rs = []
        for i in range(n):
            skip = cin if i == n - 1 else cout
            rin = prev if i == 0 else cout
            rs.append(ResnetBlock2D(rin + skip, cout, temb, g, eps, dr, ss))
        self.resnets = nn.ModuleList(rs)
        hd = cfg["attention_head_dim"] or cout
        self.attentions = nn.ModuleList([Attention(cout, hd, g, eps) for _ in range(n)]) if attn else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_up else None

    def forward(self, x, skips, temb):
        for i, r in enumerate(self.resnets):
            x = r(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, cfg, c, temb):
        super().__init__()
        g, eps, dr, ss = cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"], cfg["scale_shift"]
        f = cfg["mid_block_scale_factor"]
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb, g, eps, dr, ss, f) for _ in range(2)])
        attn_groups = cfg["attn_norm_num_groups"]
        if attn_groups is None:
            attn_groups = g if not ss else None
        hd = cfg["attention_head_dim"] or c
        self.attentions = nn.ModuleList([Attention(c, hd, attn_groups, eps, f)]) if cfg["add_attention"] else None

    def forward(self, x, temb):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = {
            "layers_per_block": config.get("layers_per_block", 2),
            "norm_num_groups": config.get("norm_num_groups", 32),
            "norm_eps": config.get("norm_eps", 1e-5),
            "dropout": config.get("dropout", 0.0),
            "scale_shift": config.get("resnet_time_scale_shift", "default") == "scale_shift",
            "attention_head_dim": config.get("attention_head_dim", 8),
            "downsample_padding": config.get("downsample_padding", 1),
            "mid_block_scale_factor": config.get("mid_block_scale_factor", 1.0),
            "attn_norm_num_groups": config.get("attn_norm_num_groups"),
            "add_attention": config.get("add_attention", True),
        }
        ch = config.get("block_out_channels", [224, 448, 672, 896])
        downs = config.get("down_block_types")
        ups = config.get("up_block_types")
        self.flip = config.get("flip_sin_to_cos", True)
        self.freq_shift = config.get("freq_shift", 0)
        self.center = config.get("center_input_sample", False)
        temb = ch[0] * 4
        self.ch0 = ch[0]
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.conv_in = nn.Conv2d(config.get("in_channels", 3), ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(downs):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(cfg, cin, cout, temb, kind.startswith("Attn"), i != len(ch) - 1))
        self.mid_block = MidBlock(cfg, ch[-1], temb)
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        cout = rev[0]
        for i, kind in enumerate(ups):
            prev, cout = cout, rev[i]
            cin = rev[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(cfg, cin, cout, prev, temb, kind.startswith("Attn"), i != len(ch) - 1))
        groups_out = cfg["norm_num_groups"] or min(ch[0] // 4, 32)
        self.conv_norm_out = nn.GroupNorm(groups_out, ch[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(ch[0], config.get("out_channels", 3), 3, padding=1)

    def forward(self, x, t):
        if self.center:
            x = 2 * x - 1.0
        emb = self.time_embedding(timestep_embedding(t, self.ch0, self.flip, self.freq_shift))
        x = self.conv_in(x)
        skips = [x]
        for b in self.down_blocks:
            x, s = b(x, emb)
            skips.extend(s)
        x = self.mid_block(x, emb)
        for b in self.up_blocks:
            x = b(x, skips, emb)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def status_mib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mib():
    return status_mib("VmHWM")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="UNet2DModel config JSON (diffusers format)")
    ap.add_argument("--workload", choices=["train", "sample"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="bf16: forward and loss under torch.autocast('cpu', dtype=torch.bfloat16)")
    ap.add_argument("--profile", action="store_true", help="also profile --iters steps per op (torch.profiler)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.config) as f:
        config = json.load(f)
    model = UNet(config)
    params = sum(p.numel() for p in model.parameters())
    c = config.get("in_channels", 3)
    s = config.get("sample_size", 32)
    s = s if isinstance(s, int) else s[0]
    x = torch.randn(args.batch, c, s, s)
    # `or`: diffusers configs write "num_train_timesteps": null.
    t = torch.randint(0, config.get("num_train_timesteps") or 1000, (args.batch,)).float()

    import contextlib

    def cast():
        if args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if args.workload == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        target = torch.randn_like(x)

        def step():
            opt.zero_grad(set_to_none=True)
            with cast():
                loss = F.mse_loss(model(x, t).float(), target)
            loss.backward()
            opt.step()

    else:
        model.eval()

        def step():
            with torch.no_grad(), cast():
                model(x, t)

    reset_peak_rss()
    base_rss = status_mib("VmRSS")
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1000.0)
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.iters):
                step()
        rows = [
            {
                "name": e.key,
                "calls": e.count / args.iters,
                "self_ms": e.self_cpu_time_total / 1000.0 / args.iters,
                "total_ms": e.cpu_time_total / 1000.0 / args.iters,
            }
            for e in prof.key_averages()
        ]
        profile = sorted(rows, key=lambda r: -r["self_ms"])
    out = {
        "workload": args.workload,
        "precision": args.precision,
        "batch": args.batch,
        "threads": args.threads,
        "median_ms": statistics.median(times),
        "times_ms": times,
        "params": params,
        "peak_rss_mib": peak_rss_mib(),
        "base_rss_mib": base_rss,
        "torch_version": torch.__version__,
    }
    if profile is not None:
        out["profile"] = profile
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
