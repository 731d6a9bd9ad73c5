"""Threads or processes: how the default suite's model gets through attack iterations on this
machine, as one process using every core or as one single-threaded process per core.

The work is the inner loop of every white-box cell (forward + input-gradient backward on a
batch of queries) on the default suite's network; each configuration runs the same number of
passes in total, and the table gives images per second.

    python benchmarks/bench_parallel.py            # prints the markdown table
"""

from __future__ import annotations

import multiprocessing
import os
import time

import torch

BATCH, PASSES = 128, 40


def _model():
    from reidbench.models import build_model
    from reidbench.zoo import DEFAULT_ZOO, load_zoo

    zoo = load_zoo(DEFAULT_ZOO)
    entry = next(e for e in zoo.values() if "default" in e.suite and e.defense["name"] == "none")
    model = build_model(entry.model_spec()).eval()
    return model, tuple(entry.model["input_size"]), entry.id


def _passes(threads: int, passes: int, queue=None) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, size, _ = _model()
    x = torch.rand(BATCH, 3, *size)
    for _ in range(2):  # warm-up
        xv = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xv).sum(), xv)
    started = time.perf_counter()
    for _ in range(passes):
        xv = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xv).sum(), xv)
    seconds = time.perf_counter() - started
    if queue is not None:
        queue.put(seconds)
    return seconds


def measure(cores: int) -> list[tuple[str, float]]:
    rows = []
    seconds = _passes(cores, PASSES)
    rows.append((f"1 process x {cores} threads", PASSES * BATCH / seconds))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_passes, args=(1, PASSES // cores, queue)) for _ in range(cores)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started  # includes the workers' start-up: the honest cost
    busiest = max(queue.get() for _ in workers)
    rows.append((f"{cores} processes x 1 thread (passes only)", (PASSES // cores) * cores * BATCH / busiest))
    rows.append((f"{cores} processes x 1 thread (with start-up)", (PASSES // cores) * cores * BATCH / wall))
    return rows


def main() -> None:
    cores = os.cpu_count() or 1
    _, size, entry_id = _model()
    rows = measure(cores)
    print(f"Model: `{entry_id}` at {size[0]}x{size[1]}, batch {BATCH}, {PASSES} forward + input-gradient "
          f"backward passes in all per configuration; {cores} cores; torch {torch.__version__}; "
          f"load average before: {os.getloadavg()[0]:.2f}\n")
    print("| configuration | images / s |\n| --- | --- |")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
    main()
