"""Forward + backward seconds of one student batch for a few architectures, side by side.

Prints the ratio of each set-up to the first (the former demo student: 8 x 144 with a
d_model-wide subsampling conv), measured in one run, so machine noise cancels:

    .venv/bin/python bench/student_step_cost.py [--frames 12000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from kdcache.student.model import Student, StudentConfig

SETUPS = [  # (subsampling_channels, layers, d_model, subsampling)
    (0, 8, 144, 4),
    (32, 8, 144, 4),
    (32, 6, 144, 4),
    (32, 12, 144, 4),
    (32, 6, 192, 4),
    (32, 8, 144, 8),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=12000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t = 16, args.frames // 16
    x, lens = torch.randn(b, t, 80), torch.full((b,), t)
    y, yl = torch.randint(3, 30, (b, 60)), torch.full((b,), 60)
    base = None
    print(
        f"{'channels':>8} {'layers':>6} {'d':>4} {'sub':>3} {'params':>8} {'s/batch':>8} {'ratio':>6}"
    )
    for ch, layers, d, sub in SETUPS:
        m = Student(
            StudentConfig(
                vocab_size=40,
                d_model=d,
                num_layers=layers,
                subsampling=sub,
                subsampling_channels=ch,
                decoder_layers=2,
            )
        )
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = m(x, lens, y, yl)
            (out.ctc_logits.mean() + out.dec_logits.mean()).backward()
            times.append(time.perf_counter() - t0)
        s = min(times[1:])
        base = base or s
        n = sum(p.numel() for p in m.parameters()) / 1e6
        print(f"{ch or d:>8} {layers:>6} {d:>4} {sub:>3} {n:7.2f}M {s:8.2f} {s / base:6.2f}")


if __name__ == "__main__":
    main()
