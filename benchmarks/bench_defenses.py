"""Training cost of each defense as a ratio to standard training, measured in the same run.

Every defense trains through the one shared loop; what differs is the batch preparation
(inner attack, proactive transforms) and the loss. The benchmark times the same number of
training steps of the same model on the same P×K batches for each defense, and reports the
ratio to the undefended baseline.

    python -m pytest benchmarks/bench_defenses.py --benchmark-enable -o addopts="" -p no:cacheprovider
    python benchmarks/bench_defenses.py [--steps 10] [--size 64 32]   # markdown table
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import pytest
import torch

import defenses  # noqa: F401
from reidbench.defense import TrainBatch, build_defense
from reidbench.models import ReIDModel
from reidbench.train.loop import Recipe

DEFENSES = ["none", "jad", "at", "goat", "goat-sma", "goat-fna"]


def training_steps(name: str, steps: int, size=(64, 32), p=16, k=4, backbone="resnet18") -> float:
    """Seconds for ``steps`` optimiser steps of ``name`` (batch preparation + loss + update)."""
    torch.manual_seed(0)
    model = ReIDModel(backbone, num_classes=p * 4, input_size=size)
    defense = build_defense(name)
    recipe = Recipe()
    optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4)
    images = torch.rand(p * k, 3, *size)
    pids = torch.arange(p).repeat_interleave(k)
    clean = TrainBatch(images, pids, torch.zeros_like(pids))
    generator = torch.Generator().manual_seed(0)

    def step():
        batch = dataclasses.replace(clean, images=defense.training_batch(model, clean, generator))
        model.train()
        loss, _ = defense.training_loss(model, batch, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, first-call dispatch
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - started


@pytest.mark.parametrize("name", DEFENSES)
def test_training_step(benchmark, name):
    torch.set_num_threads(2)
    benchmark.pedantic(training_steps, args=(name, 2), rounds=3, iterations=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 32))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device-threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.device_threads)
    times = {name: training_steps(name, args.steps, tuple(args.size), backbone=args.backbone) for name in DEFENSES}
    print(f"{args.backbone} {args.size[0]}x{args.size[1]}, batch 16x4, {args.steps} steps, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| defense | s / step | ratio to `none` |")
    print("| --- | ---: | ---: |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds / args.steps:.3f} | {seconds / times['none']:.2f} |")


if __name__ == "__main__":
    main()
