"""Attack loop overhead: an iterative attack against the bare passes it needs.

The floor of an I-FGSM-style attack is ``iterations × (forward + input-gradient backward)``
of the model; everything else (guides, projection, sign, clipping, momentum) is overhead.
Both are timed in the same run on the same model and batch, and their ratio is reported.

    python -m pytest benchmarks/bench_attacks.py --benchmark-enable -o addopts="" -p no:cacheprovider
    python benchmarks/bench_attacks.py          # prints the markdown table for benchmarks/results/
"""

from __future__ import annotations

import time

import pytest
import torch

from reidbench.attack import AttackContext, build_attack
from reidbench.features import embed
from reidbench.models import ReIDModel

BATCH, ITERS, GALLERY, DIM = 128, 15, 1000, 512


def setting(backbone="resnet18", size=(64, 32)):
    torch.manual_seed(0)
    model = ReIDModel(backbone, input_size=size).eval()
    queries = torch.rand(BATCH, 3, *size)
    with torch.no_grad():
        q_feats = embed(model, queries)
    g_feats = torch.nn.functional.normalize(torch.randn(GALLERY, q_feats.shape[1]), dim=1)
    ctx = AttackContext(
        query_pids=torch.arange(BATCH) % 50, query_camids=torch.zeros(BATCH, dtype=torch.long), query_feats=q_feats,
        gallery_feats=g_feats, gallery_pids=torch.arange(GALLERY) % 50, gallery_camids=torch.ones(GALLERY, dtype=torch.long),
    )
    return model, queries, ctx


def bare_passes(model, queries, guides):
    """The floor: the same number of forward + input-gradient backward passes, nothing else."""
    x = queries
    for _ in range(ITERS):
        x_var = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad((embed(model, x_var) * guides).sum(), x_var)
        x = x_var.detach()  # no update: only the passes are timed
    return grad


def attack_run(model, queries, ctx, name="m-ifgsm"):
    return build_attack(name, eps=5 / 255, step=1 / 255, iterations=ITERS)(model, queries, ctx)


@pytest.fixture(scope="module")
def bench_setting():
    torch.set_num_threads(2)
    return setting()


def test_bare_forward_backward(benchmark, bench_setting):
    model, queries, ctx = bench_setting
    benchmark.pedantic(bare_passes, args=(model, queries, ctx.query_feats), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("name", ["m-ifgsm"])
def test_attack_loop(benchmark, bench_setting, name):
    model, queries, ctx = bench_setting
    benchmark.pedantic(attack_run, args=(model, queries, ctx, name), rounds=3, warmup_rounds=1)


def interleaved_ratio(name="m-ifgsm", rounds=3):
    """Alternate the two measurements so drifting machine load hits both equally."""
    model, queries, ctx = setting()
    bare, attack = [], []
    attack_run(model, queries, ctx, name)
    for _ in range(rounds):
        t = time.perf_counter(); bare_passes(model, queries, ctx.query_feats); bare.append(time.perf_counter() - t)
        t = time.perf_counter(); attack_run(model, queries, ctx, name); attack.append(time.perf_counter() - t)
    return min(bare), min(attack)


if __name__ == "__main__":
    import os
    import platform
    import sys

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"setting: resnet18 at 64x32, batch {BATCH}, {ITERS} iterations, gallery {GALLERY}\n")
    print("| attack | bare fwd+bwd (s) | attack (s) | overhead |")
    print("| --- | --- | --- | --- |")
    for name in sys.argv[1:] or ("m-ifgsm", "m-mifgsm", "sma", "fna", "lta"):
        try:
            bare, attack = interleaved_ratio(name)
        except Exception as exc:  # an attack not registered in this checkout
            print(f"| {name} | – | – | not run: {exc.__class__.__name__} |")
            continue
        print(f"| {name} | {bare:.3f} | {attack:.3f} | {100 * (attack / bare - 1):+.1f}% |")
