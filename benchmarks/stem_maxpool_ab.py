"""A/B of one change on the VGG-16 Guided step: run it once per source tree, alternating trees.

    PYTHONPATH=<tree> python benchmarks/stem_maxpool_ab.py <tree>

Times CE and trust + Guided Grad-CAM steps (batch 8, 224 px, 2 threads; benchmarks/speed.py's steps) side by side
in one process and prints the Guided ÷ CE ratio. Used for the stem max-pool change (results in
benchmarks/results/stem_maxpool_ab.md).
"""
import sys, time, statistics, torch
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from speed import build_setup, make_step
torch.set_num_threads(2)
built, classes = build_setup("vgg16")
g = torch.Generator().manual_seed(0)
B = 8
x = torch.randn(B, 3, 224, 224, generator=g); y = torch.randint(0, classes, (B,), generator=g)
data = (x, y, torch.zeros(0))
steps = {s: make_step(built, classes, s, torch.device("cpu"))[0] for s in ["ce", "guided"]}
for s in steps:
    for _ in range(2): steps[s](data)
t = {s: [] for s in steps}
for r in range(4):
    for s, st in steps.items():
        a = time.perf_counter(); st(data); t[s].append(time.perf_counter() - a)
m = {s: statistics.median(v) for s, v in t.items()}
import trustcnn.saliency.stem as stem
print(sys.argv[1], stem.__file__, {s: round(v, 3) for s, v in m.items()}, "ratio", round(m["guided"] / m["ce"], 3), flush=True)
