#!/usr/bin/env python3
"""diffusers' DDIMPipeline on a model folder, timed: the Python side of the DDIM speed comparison
(`cargo run --release --example diffusers_sample -- ddim ...`, later `diffuse sample --diffusers
DIR --sampler ddim --steps 50 --n 16`). Needs `pip install torch diffusers`.

    python3 bench/diffusers_ddim.py DIR --steps 50 --n 16 --threads 2

loads DIR with `DDIMPipeline.from_pretrained` (which turns the folder's scheduler config into a
DDIMScheduler, as the pipeline always does), runs one untimed warm-up call with 2 steps, then
times `pipe(batch_size=n, num_inference_steps=steps, eta=eta, output_type="np")` (x_T drawn
from a seeded torch.Generator). Prints one JSON object: {"impl", "seconds", "steps", "n",
"threads", "eta", "timesteps", "torch_version", "diffusers_version"}.

With --x-t FILE (a safetensors file holding "x_t" [n, C, H, W]) the pipeline's own loop is run
from that x_T instead (unet(x, t) then scheduler.step(..., eta=eta).prev_sample at every
timestep, exactly DDIMPipeline.__call__ without the final [0, 1] mapping) and --out FILE
receives "sample", for comparing trajectories with diffuse.
"""

import argparse
import json
import sys
import time

import torch
import diffusers
from diffusers import DDIMPipeline
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x-t", dest="x_t", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = DDIMPipeline.from_pretrained(args.dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    with torch.no_grad():
        if args.x_t is None:
            pipe(batch_size=args.n, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(args.seed))  # warm-up
            start = time.perf_counter()
            pipe(batch_size=args.n, num_inference_steps=args.steps, eta=args.eta, output_type="np",
                 generator=torch.Generator().manual_seed(args.seed))
            seconds = time.perf_counter() - start
        else:
            image = load_file(args.x_t)["x_t"].float()
            assert image.shape[0] == args.n, f"x_t has {image.shape[0]} samples, --n is {args.n}"
            sched = pipe.scheduler
            sched.set_timesteps(args.steps)
            gen = torch.Generator().manual_seed(args.seed)  # used only when eta > 0
            start = time.perf_counter()
            for t in sched.timesteps:
                model_output = pipe.unet(image, t).sample
                image = sched.step(model_output, t, image, eta=args.eta, generator=gen).prev_sample
            seconds = time.perf_counter() - start
            if args.out:
                save_file({"sample": image.contiguous()}, args.out)
    print(json.dumps({
        "impl": "diffusers", "what": "ddim", "seconds": seconds, "steps": args.steps, "n": args.n,
        "threads": torch.get_num_threads(), "eta": args.eta,
        "timesteps": [int(t) for t in pipe.scheduler.timesteps],
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
