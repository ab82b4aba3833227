"""The learning-rate schedule of every msd training run: `msd train` and `msd baseline`.

One rule turns `train.warmup_ratio` into warm-up steps and one function gives the rate of each
step, so MSD and its baselines (TRL's trainers, `msd.baselines.run`) train on the same schedule.

    warm-up steps W = round(warmup_ratio * total_steps)
    factor(s) = (s + 1) / (W + 1)            for the steps s < W (0-based)
              = decay((s - W) / (total - W))  after: cosine, linear or constant (train.schedule)

The rate of step s is train.lr * factor(s); the first step's is never 0. (Transformers' own
warm-up, which TRL used before, rounds W up and starts at s / W: a 2-step DPO run at the default
ratio trained its first step at rate 0.)
"""

from __future__ import annotations

import math


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warm-up steps of a run of `total_steps` optimizer steps (Python's round: half to even)."""
    return int(round(warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """The share of train.lr that optimizer step `step` (0-based) uses."""
    warmup = warmup_steps(warmup_ratio, total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, tc, total_steps: int):
    """torch's LambdaLR over `lr_factor` for the train section `tc` (stepped once per
    optimizer step; its rate before stepping is the one the step used)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, tc.warmup_ratio, tc.schedule))
