"""pytorch-fid's side of `diffuse eval fid --compare-torch`: the same weights file in pytorch-fid's
own InceptionV3, the same images, the same threads; times the feature extraction (resize included,
as pytorch-fid's get_activations does it; image decoding excluded on both sides) and writes the
features so that diffuse can report the largest difference.

    python3 bench/fid_reference.py --weights W --images X.npy --dims 2048 --batch 25 --threads 2 --out F.npy

Prints one JSON object: seconds, images, threads, torch_version.
"""
import argparse
import json
import os
import time

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--dims", type=int, default=2048)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import pytorch_fid.inception as pfi

    if a.weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        weights = load_file(a.weights)
    else:
        weights = torch.load(a.weights, map_location="cpu", weights_only=True)

    def load(url, progress=True):
        # pytorch-fid loads strictly: the unused fc layer and BatchNorm counters from a template
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        sd = net.state_dict()
        for k in sd:
            if k in weights:
                sd[k] = weights[k]
        return sd

    pfi.load_state_dict_from_url = load
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[a.dims]]).eval()
    x = torch.from_numpy(np.load(a.images).astype(np.float32))
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    feats = []
    with torch.no_grad():
        model(x[:1])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(x), a.batch):
            pred = model(x[i : i + a.batch])[0]
            if pred.size(2) != 1 or pred.size(3) != 1:
                pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
            feats.append(pred.squeeze(3).squeeze(2))
        seconds = time.perf_counter() - t
    np.save(a.out, torch.cat(feats).numpy())
    print(json.dumps({"seconds": seconds, "images": len(x), "threads": torch.get_num_threads(), "torch_version": torch.__version__}))


if __name__ == "__main__":
    main()
