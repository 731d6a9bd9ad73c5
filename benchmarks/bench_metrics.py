"""Benchmarks for ``reidbench.metrics``: ranking metrics and k-reciprocal re-ranking.

pytest-benchmark (skipped by the repo's default options)::

    python3 -m pytest benchmarks/bench_metrics.py --benchmark-enable -p no:cacheprovider -o addopts=""

Script mode, printing the markdown table kept in ``benchmarks/results/metrics.md``::

    python3 benchmarks/bench_metrics.py            # full sizes (the loop re-ranking takes minutes, ~9 GB)
    python3 benchmarks/bench_metrics.py --quick    # loop re-ranking only at the reduced size

What is compared:

* ``evaluate_rank`` against the per-query reference of ``reidbench.metrics.reference``
  (the one the tests hold it to: stable order of the row with its negatives first --
  pessimistic ties --, drop junk / same-camera entries, CMC, AP and INP), on a Market-1501-sized
  random problem (3,368 x 15,913 uniform distances, 751 ids with pid 0 as distractors,
  5% junk, 6 cameras), both in the same process on the same data.
* ``k_reciprocal_rerank`` against the reference re-ranking of ``reidbench.metrics.reference``
  (the one the tests hold it to), a loop implementation with the data layout of the
  authors' Python code (dense (Q+G)^2 float32 distance, rank and encoding matrices, a
  Python loop per row, an inverted index built from the dense encoding), on clustered
  random features of Market size (3,368 + 15,913 images of 751 identities).
* ``evaluate_rank`` on an MSMT17-sized problem (11,659 x 82,161, 3,060 ids, 15 cameras),
  whose float32 distance matrix alone is 3.8 GB.

Times and memory are measured in fresh subprocesses: memory is the process's peak
resident set (``ru_maxrss``, which sees torch's allocations as well as NumPy's) and the
part of it above the resident set just before the timed call (the inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Other jobs share this machine's two cores. With libgomp's default spin-then-sleep
# waiting, every small parallel torch op then stalls on a descheduled OpenMP worker
# (seconds lost per thousand ops); passive waiting removes that artefact. It must be set
# before torch loads, and it is passed on to the measurement subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reidbench.metrics import evaluate_rank, k_reciprocal_rerank, pairwise_distance  # noqa: E402
from reidbench.metrics.reference import reference_rank, reference_rerank  # noqa: E402

MARKET_RANK = dict(Q=3368, G=15913, ids=751, cams=6)
MSMT_RANK = dict(Q=11659, G=82161, ids=3060, cams=15)
MARKET_FEATURES = dict(Q=3368, G=15913, ids=751)
SMALL_FEATURES = dict(Q=842, G=3978, ids=188)  # a quarter of Market per side


# ------------------------------------------------------------------------------ problems


def rank_problem(Q: int, G: int, ids: int, cams: int, seed: int = 0, junk: float = 0.05):
    """Uniform random distances; gallery pids in 0..ids-1 (0 = distractors) with a
    fraction of junk (-1); query pids in 1..ids-1."""
    g = torch.Generator().manual_seed(seed)
    distmat = torch.rand(Q, G, generator=g)
    q_pids = torch.randint(1, ids, (Q,), generator=g)
    g_pids = torch.randint(0, ids, (G,), generator=g)
    g_pids[torch.rand(G, generator=g) < junk] = -1
    q_cams = torch.randint(0, cams, (Q,), generator=g)
    g_cams = torch.randint(0, cams, (G,), generator=g)
    return distmat, q_pids, g_pids, q_cams, g_cams


def feature_problem(Q: int, G: int, ids: int, dim: int = 64, seed: int = 0):
    """Query / gallery features around one random centre per identity, and their
    query-gallery, query-query and gallery-gallery Euclidean distances."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ids, dim, generator=g)
    q = centers[torch.randint(0, ids, (Q,), generator=g)] + 0.7 * torch.randn(Q, dim, generator=g)
    x = centers[torch.randint(0, ids, (G,), generator=g)] + 0.7 * torch.randn(G, dim, generator=g)
    return pairwise_distance(q, x), pairwise_distance(q, q), pairwise_distance(x, x)


# ----------------------------------------------------------------------------- baselines


def numpy_loop_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """The reference evaluation (:func:`reidbench.metrics.reference.reference_rank`) as the
    baseline: (cmc, mAP, mINP)."""
    out = reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    return out["cmc"], float(out["mAP"]), float(out["mINP"])


# ------------------------------------------------------------------ subprocess workers


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, rounds: int = 1):
    """(wall seconds, CPU seconds of all threads) of the fastest of ``rounds`` calls, and
    the result of the last call."""
    best, out = (float("inf"), float("nan")), None
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best = min(best, (wall, cpu))
    return best, out


def worker(name: str, save: str | None = None) -> dict:
    """One measurement, run in a fresh interpreter so its peak RSS is its own. Re-ranking
    workers write their output to ``save`` (.npy) when given, for the cross-check."""
    if name == "rank_market":
        args = rank_problem(**MARKET_RANK)
        before = _rss_now_mb()
        (ours_s, ours_cpu), res = _timed(lambda: evaluate_rank(*args), rounds=3)
        peak = _peak_rss_mb()
        (loop_s, loop_cpu), (cmc, mAP, mINP) = _timed(lambda: numpy_loop_rank(*(a.numpy() for a in args)))
        assert abs(res.mAP - mAP) < 1e-9 and abs(res.mINP - mINP) < 1e-9
        assert np.allclose(res.cmc.numpy(), cmc)
        return dict(secs=ours_s, cpu_s=ours_cpu, loop_secs=loop_s, loop_cpu_s=loop_cpu,
                    rss_before_mb=before, peak_rss_mb=peak, mAP=res.mAP)
    if name == "rank_msmt":
        args = rank_problem(**MSMT_RANK)
        before = _rss_now_mb()
        (secs, cpu), res = _timed(lambda: evaluate_rank(*args))
        return dict(secs=secs, cpu_s=cpu, rss_before_mb=before, peak_rss_mb=_peak_rss_mb(), mAP=res.mAP)
    if name in ("rerank_market", "rerank_market_loop", "rerank_small", "rerank_small_loop"):
        sizes = MARKET_FEATURES if name.startswith("rerank_market") else SMALL_FEATURES
        mats = feature_problem(**sizes)
        if name.endswith("_loop"):
            mats = tuple(m.numpy() for m in mats)
            fn = lambda: reference_rerank(*mats)  # noqa: E731
        else:
            fn = lambda: k_reciprocal_rerank(*mats)  # noqa: E731
        before = _rss_now_mb()
        (secs, cpu), out = _timed(fn)
        peak = _peak_rss_mb()
        if save:
            np.save(save, np.asarray(out))
        return dict(secs=secs, cpu_s=cpu, rss_before_mb=before, peak_rss_mb=peak)
    raise SystemExit(f"unknown worker {name}")


def run_worker(name: str, save: str | None = None, timeout: float = 3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    proc = subprocess.run(
        cmd + (["--save", save] if save else []),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- pytest-benchmark


def test_evaluate_rank_market(benchmark):
    args = rank_problem(**MARKET_RANK)
    res = benchmark.pedantic(evaluate_rank, args=args, rounds=3, iterations=1)
    t0 = time.perf_counter()
    _, mAP, _ = numpy_loop_rank(*(a.numpy() for a in args))
    loop_s = time.perf_counter() - t0
    assert abs(res.mAP - mAP) < 1e-9
    benchmark.extra_info["numpy_loop_s"] = loop_s
    benchmark.extra_info["speedup_vs_numpy_loop"] = loop_s / benchmark.stats.stats.min


def test_numpy_loop_rank_market(benchmark):
    args = tuple(a.numpy() for a in rank_problem(**MARKET_RANK))
    benchmark.pedantic(numpy_loop_rank, args=args, rounds=1, iterations=1)


def test_rerank_small_vs_loop(benchmark):
    mats = feature_problem(**SMALL_FEATURES)
    out = benchmark.pedantic(k_reciprocal_rerank, args=mats, rounds=3, iterations=1)
    t0 = time.perf_counter()
    ref = reference_rerank(*(m.numpy() for m in mats))
    loop_s = time.perf_counter() - t0
    assert np.abs(out.numpy() - ref).max() < 1e-5
    benchmark.extra_info["loop_s"] = loop_s
    benchmark.extra_info["speedup_vs_loop"] = loop_s / benchmark.stats.stats.min


def test_rerank_market(benchmark):
    mats = feature_problem(**MARKET_FEATURES)
    benchmark.pedantic(k_reciprocal_rerank, args=mats, rounds=1, iterations=1)
    info = run_worker("rerank_market")
    benchmark.extra_info["subprocess_s"] = info["secs"]
    benchmark.extra_info["subprocess_peak_rss_mb"] = info["peak_rss_mb"]
    benchmark.extra_info["subprocess_rss_before_mb"] = info["rss_before_mb"]


def test_evaluate_rank_msmt(benchmark):
    args = rank_problem(**MSMT_RANK)  # 3.8 GB of distances
    benchmark.pedantic(evaluate_rank, args=args, rounds=1, iterations=1)
    del args
    info = run_worker("rank_msmt")
    benchmark.extra_info["subprocess_s"] = info["secs"]
    benchmark.extra_info["subprocess_peak_rss_mb"] = info["peak_rss_mb"]
    benchmark.extra_info["subprocess_rss_before_mb"] = info["rss_before_mb"]


# -------------------------------------------------------------------------- script mode


def _fmt_s(x: float) -> str:
    return f"{x:.2f} s" if x >= 0.995 else f"{x * 1000:.0f} ms"


def _fmt_mb(x: float) -> str:
    return f"{x / 1024:.2f} GB" if x >= 1024 else f"{x:.0f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="skip the full-size loop re-ranking")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.save)))
        return

    load_before = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        outs = {k: os.path.join(tmp, k + ".npy") for k in ("small", "small_loop", "market", "market_loop")}
        rank = run_worker("rank_market")
        small_ours = run_worker("rerank_small", outs["small"])
        small_loop = run_worker("rerank_small_loop", outs["small_loop"])
        market_ours = run_worker("rerank_market", outs["market"])
        market_loop = None if args.quick else run_worker("rerank_market_loop", outs["market_loop"])
        msmt = run_worker("rank_msmt")
        diffs = {"small": float(np.abs(np.load(outs["small"]) - np.load(outs["small_loop"])).max())}
        if market_loop is not None:
            diffs["market"] = float(np.abs(np.load(outs["market"]) - np.load(outs["market_loop"])).max())
    load_after = os.getloadavg()

    def mem(info):
        return f"{_fmt_mb(info['peak_rss_mb'])} ({_fmt_mb(info['peak_rss_mb'] - info['rss_before_mb'])})"

    def times(info, key="secs", cpu="cpu_s"):
        return f"{_fmt_s(info[key])} ({_fmt_s(info[cpu])})"

    def ratio(fast, slow, fkey="secs", skey="secs", fcpu="cpu_s", scpu="cpu_s"):
        return f"**{slow[skey] / fast[fkey]:.1f}x** ({slow[scpu] / fast[fcpu]:.1f}x)"

    rows = [
        "| benchmark | size | reidbench: wall (CPU) | baseline: wall (CPU) | speed-up: wall (CPU) "
        "| reidbench: peak RSS (above inputs) | baseline: peak RSS (above inputs) |",
        "|---|---|---|---|---|---|---|",
        f"| `evaluate_rank` vs NumPy per-query loop | 3,368 x 15,913 | {times(rank)} | "
        f"{times(rank, 'loop_secs', 'loop_cpu_s')} | "
        f"{ratio(rank, rank, skey='loop_secs', scpu='loop_cpu_s')} | {mem(rank)} | (same process) |",
        f"| `k_reciprocal_rerank` vs loop re-ranking | 842 + 3,978 | {times(small_ours)} | "
        f"{times(small_loop)} | {ratio(small_ours, small_loop)} | {mem(small_ours)} | {mem(small_loop)} |",
    ]
    if market_loop is not None:
        rows.append(
            f"| `k_reciprocal_rerank` vs loop re-ranking | 3,368 + 15,913 | {times(market_ours)} | "
            f"{times(market_loop)} | {ratio(market_ours, market_loop)} | {mem(market_ours)} | {mem(market_loop)} |"
        )
    else:
        rows.append(
            f"| `k_reciprocal_rerank` | 3,368 + 15,913 | {times(market_ours)} | (not run) | | {mem(market_ours)} | |"
        )
    rows.append(f"| `evaluate_rank` (MSMT17 size) | 11,659 x 82,161 | {times(msmt)} | | | {mem(msmt)} | |")
    agree = ", ".join(f"{k} size {v:.1e}" for k, v in diffs.items())
    print("\n".join(rows))
    print()
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, no GPU used; "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; "
        f"wall time {time.time() - t_start:.0f} s. Max |reidbench - loop| over the whole "
        f"re-ranked matrix: {agree}."
    )


if __name__ == "__main__":
    main()
