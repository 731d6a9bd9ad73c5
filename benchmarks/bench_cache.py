"""What checking the cache costs: ``reidbench.cache`` writes and loads against plain torch.

Script mode, printing the markdown table kept in ``benchmarks/results/cache.md``::

    python3 benchmarks/bench_cache.py

For a uint8 image tensor the size of a decoded dataset (4,000 images at the synthetic size, and
Market-1501's trainsplit at 128x64: 12,936 images, 318 MB), in a temporary folder:

* write: ``torch.save`` against ``cache.save_torch`` (temporary file, fsync, sha256 of the
  file, sidecar, rename);
* load: ``torch.load`` against ``cache.load_verified`` the first time in a process (size and
  sha256 checked, then loaded) and again (checked once per process and file version).

Each timing is the median of 3 runs, wall and CPU (this process, all threads).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reidbench import cache  # noqa: E402

SIZES = {"4,000 images of 3x64x32 (the synthetic image size)": (4000, 3, 64, 32),
         "Market trainsplit at 128x64 (12,936 x 3x128x64)": (12936, 3, 128, 64)}


def timed(fn, repeat: int = 3) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0] * 1000:.0f} ms ({t[1] * 1000:.0f} ms)"


def main() -> None:
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape in SIZES.items():
            blob = {"images": torch.randint(0, 256, shape, dtype=torch.uint8)}
            plain, checked = Path(tmp) / "plain.pt", Path(tmp) / "checked.pt"
            save_plain = timed(lambda: torch.save(blob, plain))
            save_checked = timed(lambda: cache.save_torch(blob, checked))
            load_plain = timed(lambda: load(plain))

            def first_load():
                cache._VERIFIED.clear()
                assert cache.load_verified(checked, load) is not None

            load_first = timed(first_load)
            load_again = timed(lambda: cache.load_verified(checked, load))
            mb = plain.stat().st_size / 1e6
            rows.append(f"| {label} | {mb:.0f} MB | {fmt(save_plain)} | {fmt(save_checked)} | {fmt(load_plain)} | "
                        f"{fmt(load_first)} | {fmt(load_again)} |")
    print("| tensor | file | `torch.save` | `cache.save_torch` | `torch.load` | `load_verified`, first | "
          "`load_verified`, again |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntorch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
