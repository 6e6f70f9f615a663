"""Convert pytorch-fid's InceptionV3 weights to a file `diffuse eval fid --inception` reads.

pytorch-fid's published weights, pt_inception-2015-12-05-6726825d.pth (about 91 MB,
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth,
the file pytorch-fid itself downloads into ~/.cache/torch/hub/checkpoints/), are in PyTorch's
legacy (pre-zip) serialization, which `diffuse` does not read. Run this once:

    pip install torch safetensors
    python3 tools/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors
    diffuse eval fid --inception fid_inception.safetensors --samples S --reference R

It keeps pytorch-fid's key names (`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`,
...), drops `num_batches_tracked` and the unused 1008-class `fc` layer, checks that every layer of the
FID network is present with its shape, and writes float32 tensors. `--pth` writes a state dict in the
current zip format instead (also readable by `diffuse`).
"""
import argparse
import sys

import torch

# (name, [out, in, kh, kw]) of every BasicConv2d of pytorch-fid's fid_inception_v3()
def fid_layers():
    layers = [
        ("Conv2d_1a_3x3", 32, 3, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 64, 32, 3, 3),
        ("Conv2d_3b_1x1", 80, 64, 1, 1), ("Conv2d_4a_3x3", 192, 80, 3, 3),
    ]
    def a(n, c, pool):
        return [(f"{n}.branch1x1", 64, c, 1, 1), (f"{n}.branch5x5_1", 48, c, 1, 1), (f"{n}.branch5x5_2", 64, 48, 5, 5),
                (f"{n}.branch3x3dbl_1", 64, c, 1, 1), (f"{n}.branch3x3dbl_2", 96, 64, 3, 3),
                (f"{n}.branch3x3dbl_3", 96, 96, 3, 3), (f"{n}.branch_pool", pool, c, 1, 1)]
    def c_(n, c7):
        return [(f"{n}.branch1x1", 192, 768, 1, 1), (f"{n}.branch7x7_1", c7, 768, 1, 1), (f"{n}.branch7x7_2", c7, c7, 1, 7),
                (f"{n}.branch7x7_3", 192, c7, 7, 1), (f"{n}.branch7x7dbl_1", c7, 768, 1, 1),
                (f"{n}.branch7x7dbl_2", c7, c7, 7, 1), (f"{n}.branch7x7dbl_3", c7, c7, 1, 7),
                (f"{n}.branch7x7dbl_4", c7, c7, 7, 1), (f"{n}.branch7x7dbl_5", 192, c7, 1, 7),
                (f"{n}.branch_pool", 192, 768, 1, 1)]
    def e(n, c):
        return [(f"{n}.branch1x1", 320, c, 1, 1), (f"{n}.branch3x3_1", 384, c, 1, 1), (f"{n}.branch3x3_2a", 384, 384, 1, 3),
                (f"{n}.branch3x3_2b", 384, 384, 3, 1), (f"{n}.branch3x3dbl_1", 448, c, 1, 1),
                (f"{n}.branch3x3dbl_2", 384, 448, 3, 3), (f"{n}.branch3x3dbl_3a", 384, 384, 1, 3),
                (f"{n}.branch3x3dbl_3b", 384, 384, 3, 1), (f"{n}.branch_pool", 192, c, 1, 1)]
    layers += a("Mixed_5b", 192, 32) + a("Mixed_5c", 256, 64) + a("Mixed_5d", 288, 64)
    layers += [("Mixed_6a.branch3x3", 384, 288, 3, 3), ("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1),
               ("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    layers += c_("Mixed_6b", 128) + c_("Mixed_6c", 160) + c_("Mixed_6d", 160) + c_("Mixed_6e", 192)
    layers += [("Mixed_7a.branch3x3_1", 192, 768, 1, 1), ("Mixed_7a.branch3x3_2", 320, 192, 3, 3),
               ("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
               ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    layers += e("Mixed_7b", 1280) + e("Mixed_7c", 2048)
    return layers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="pytorch-fid's .pth (legacy or zip format)")
    p.add_argument("output", help="the .safetensors (or, with --pth, .pth) to write")
    p.add_argument("--pth", action="store_true", help="write a zip-format PyTorch state dict instead")
    args = p.parse_args()
    sd = torch.load(args.input, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = {}
    for name, o, c, kh, kw in fid_layers():
        want = {f"{name}.conv.weight": (o, c, kh, kw)}
        for k in ("weight", "bias", "running_mean", "running_var"):
            want[f"{name}.bn.{k}"] = (o,)
        for key, shape in want.items():
            if key not in sd:
                sys.exit(f"{args.input}: no tensor `{key}`: not pytorch-fid's InceptionV3 weights")
            if tuple(sd[key].shape) != shape:
                sys.exit(f"{args.input}: `{key}` has shape {tuple(sd[key].shape)}, expected {shape}")
            out[key] = sd[key].detach().to(torch.float32).contiguous()
    if args.pth:
        torch.save(out, args.output)
    else:
        from safetensors.torch import save_file
        save_file(out, args.output)
    print(f"wrote {args.output}: {len(out)} tensors")


if __name__ == "__main__":
    main()
