"""Attack loop overhead: an iterative attack against the bare passes it needs.

The floor of an attack is the model passes it makes: for an I-FGSM-style loop
``iterations × (forward + input-gradient backward)``, plus whatever forward passes its design
adds (a guide image's features, a second view). They are counted while the attack runs (a
hook on the model: passes with and without autograd) and timed bare, on the same model and
batch; everything else (guides, projection, sign, clipping, momentum) is overhead, and the
table reports attack time / floor time.

    python -m pytest benchmarks/bench_attacks.py --benchmark-enable -o addopts="" -p no:cacheprovider
    python benchmarks/bench_attacks.py [--rounds N] [ATTACK ...]   # the markdown table for
                                                # benchmarks/results/ (every iterative white-box attack,
                                                # or those named; best of N interleaved rounds, default 10)
"""

from __future__ import annotations

import time

import pytest
import torch

from reidbench.attack import AttackContext, build_attack
from reidbench.features import embed
from reidbench.models import build_model
from reidbench.registry import ATTACKS
from reidbench.zoo import load_zoo

BATCH, ITERS, GALLERY = 128, 15, 1000


def default_baseline_spec() -> dict:
    """The network the default suite attacks most: its undefended baseline's model spec, read
    from the zoo so that the benchmark follows the default scale when it changes."""
    entry = next(e for e in load_zoo().values() if "default" in e.suite and e.defense["name"] == "none")
    return entry.model_spec()


def setting(spec=None):
    torch.manual_seed(0)
    spec = spec or default_baseline_spec()
    model = build_model(spec).eval()
    queries = torch.rand(BATCH, 3, *spec["input_size"])
    with torch.no_grad():
        q_feats = embed(model, queries)
    g_feats = torch.nn.functional.normalize(torch.randn(GALLERY, q_feats.shape[1]), dim=1)
    ctx = AttackContext(
        query_pids=torch.arange(BATCH) % 50, query_camids=torch.zeros(BATCH, dtype=torch.long), query_feats=q_feats,
        gallery_feats=g_feats, gallery_pids=torch.arange(GALLERY) % 50, gallery_camids=torch.ones(GALLERY, dtype=torch.long),
    )
    return model, queries, ctx


def iterative_attacks() -> list[str]:
    """Every white-box attack of the protocol's grid with an iteration loop (the
    ``strengthenable`` trait): each gets a row, so a new one is measured without editing this
    file (wrappers such as EOT and BPDA are measured through the attacks they wrap)."""
    from reidbench.protocol import load_protocol

    return [name for name in load_protocol().attacks("white-box") if ATTACKS.get(name).strengthenable]


def attack_run(model, queries, ctx, name="m-ifgsm"):
    return build_attack(name, eps=5 / 255, step=1 / 255, iterations=ITERS)(model, queries, ctx)


@pytest.fixture(scope="module")
def bench_setting():
    torch.set_num_threads(2)
    return setting()


def test_bare_forward_backward(benchmark, bench_setting):
    model, queries, ctx = bench_setting
    benchmark.pedantic(floor_passes, args=(model, queries, ctx.query_feats, ITERS, 0), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("name", iterative_attacks())
def test_attack_loop(benchmark, bench_setting, name):
    model, queries, ctx = bench_setting
    benchmark.pedantic(attack_run, args=(model, queries, ctx, name), rounds=3, warmup_rounds=1)


def count_passes(model, queries, ctx, name) -> tuple[int, int]:
    """(forward passes under autograd, forward passes without) of one run of the attack,
    each counted in units of the whole batch."""
    counts = [0.0, 0.0]

    def hook(module, args, output):
        counts[0 if torch.is_grad_enabled() else 1] += args[0].shape[0] / BATCH

    handle = model.register_forward_hook(hook)
    try:
        attack_run(model, queries, ctx, name)
    finally:
        handle.remove()
    return round(counts[0]), round(counts[1])


def floor_passes(model, queries, guides, grad_passes: int, plain_passes: int):
    """The attack's passes and nothing else: forward + input-gradient backward, and forward alone."""
    for _ in range(grad_passes):
        x_var = queries.detach().requires_grad_(True)
        torch.autograd.grad((embed(model, x_var) * guides).sum(), x_var)
    with torch.no_grad():
        for _ in range(plain_passes):
            embed(model, queries)


def interleaved_ratio(name="m-ifgsm", rounds=3):
    """Alternate the two measurements so drifting machine load hits both equally; returns
    (passes with / without autograd, best floor time, best attack time)."""
    model, queries, ctx = setting()
    passes = count_passes(model, queries, ctx, name)
    floor, attack = [], []
    for _ in range(rounds):
        t = time.perf_counter(); floor_passes(model, queries, ctx.query_feats, *passes); floor.append(time.perf_counter() - t)
        t = time.perf_counter(); attack_run(model, queries, ctx, name); attack.append(time.perf_counter() - t)
    return passes, min(floor), min(attack)


if __name__ == "__main__":
    import argparse
    import os
    import platform

    parser = argparse.ArgumentParser(description="attack time against its counted floor, as a markdown table")
    parser.add_argument("attacks", nargs="*", help="attack names (default: every iterative grid attack)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds, best of each (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"setting: {default_baseline_spec()} (random weights), batch {BATCH}, {ITERS} iterations, "
          f"gallery {GALLERY}\n")
    print("| attack | passes (fwd+bwd / fwd) | floor (s) | attack (s) | overhead |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.attacks or iterative_attacks():
        passes, floor, attack = interleaved_ratio(name, args.rounds)
        print(f"| {name} | {passes[0]} / {passes[1]} | {floor:.3f} | {attack:.3f} | {100 * (attack / floor - 1):+.1f}% |",
              flush=True)
