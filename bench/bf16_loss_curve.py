#!/usr/bin/env python3
"""Mean training loss per 100 steps of three runs of the default recipe: f32 seed 0, f32 seed 1
and bf16 seed 0 (`diffuse train --out RUNS/<name> --seed S [--precision bf16] --steps 1000`),
with the seed-to-seed spread beside the bf16-to-f32 difference. Usage: bf16_loss_curve.py [RUNS]."""
import sys
RUNS = sys.argv[1] if len(sys.argv) > 1 else "runs"
import json
def load(p):
    return {j['step']: j['loss'] for j in map(json.loads, open(p)) if 'loss' in j}
a=load(RUNS + '/f32s0/metrics.jsonl'); b=load(RUNS + '/f32s1/metrics.jsonl'); c=load(RUNS + '/bf16s0/metrics.jsonl')
print("steps      f32 s0   f32 s1   bf16 s0   |s0-s1|  |bf16-s0|")
worst=0
for w in range(0,1000,100):
    r=range(w+1,w+101)
    m=[sum(d[s] for s in r)/100 for d in (a,b,c)]
    sp=abs(m[0]-m[1]); dv=abs(m[2]-m[0])
    print(f"{w+1:4d}-{w+100:4d}  {m[0]:.4f}  {m[1]:.4f}  {m[2]:.4f}   {sp:.4f}   {dv:.4f}")
fd={}
for p,n in [(RUNS + '/f32s0/metrics.jsonl','f32 s0'),(RUNS + '/f32s1/metrics.jsonl','f32 s1'),(RUNS + '/bf16s0/metrics.jsonl','bf16 s0')]:
    for j in map(json.loads, open(p)):
        if 'fd' in j or 'fid' in j or any(k.startswith('fd') for k in j):
            print(n, {k:v for k,v in j.items() if k!='elapsed_s'})
