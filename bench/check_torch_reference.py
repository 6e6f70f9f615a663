#!/usr/bin/env python3
"""Checks that torch_reference.UNet is diffusers' UNet2DModel: same parameter names and shapes,
same outputs with the same weights (needs `pip install torch diffusers`; not a test)."""
import sys

import torch
from diffusers import UNet2DModel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_reference import UNet  # noqa: E402

CONFIGS = [
    dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[32, 64], layers_per_block=1,
         down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
         norm_num_groups=8, attention_head_dim=8),
    dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=[32, 64, 64], layers_per_block=2,
         down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
         up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_num_groups=8,
         resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None),
]

for cfg in CONFIGS:
    torch.manual_seed(0)
    ref, ours = UNet2DModel(**cfg).eval(), UNet(cfg).eval()
    a, b = ref.state_dict(), ours.state_dict()
    assert set(a) == set(b), (set(a) ^ set(b))
    assert all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(a)
    x, t = torch.randn(2, cfg["in_channels"], 16, 16), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        diff = (ref(x, t).sample - ours(x, t)).abs().max().item()
    print(f"params {sum(p.numel() for p in ours.parameters())}: max |diffusers - torch_reference| = {diff:.2e}")
    assert diff < 1e-5
