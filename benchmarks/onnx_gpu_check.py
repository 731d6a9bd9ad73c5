"""The ONNX converter on a GPU: every operator case of tests/test_onnx_operators.py matches its
CPU output on CUDA with input gradients, and the converted OSNet-like net and ResNet-18 (see
bench_onnx.py) against the same nets in native torch on the GPU (median ms per batch).

    python benchmarks/onnx_gpu_check.py      # needs a CUDA device; run from the repository root
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path[:0] = [".", "tests", "benchmarks"]

import test_onnx_operators as cases  # noqa: E402
from bench_onnx import build, export, forward, forward_backward  # noqa: E402

from reidbench.models.onnx_import import load_onnx_model  # noqa: E402


def operators_on_cuda(folder: Path, device: torch.device) -> None:
    bad = 0
    for name, opset, nodes, initializers, differentiable in cases.CASES:
        path = cases.save(folder, nodes, initializers, opset=opset, tag=name.replace("-", "_"))
        graph = load_onnx_model(path, {"input_size": [cases.H, cases.W]}).graph
        x = torch.rand(3, 3, cases.H, cases.W, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
        on_cpu = graph(x).detach()
        graph = graph.to(device)
        x = x.to(device).requires_grad_(True)
        out = graph(x)
        error = float((out.detach().cpu() - on_cpu).abs().max())
        gradient_ok = True
        if differentiable:
            out.sum().backward()
            gradient_ok = bool(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0)
        if error > 1e-4 or not gradient_ok:
            bad += 1
            print(f"MISMATCH {name}: max |cuda - cpu| {error:.1e}, gradient ok {gradient_ok}", flush=True)
    print(f"operator cases on cuda: {len(cases.CASES) - bad}/{len(cases.CASES)} match CPU", flush=True)


def median_ms(fn, x, rounds: int = 20) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def speed(folder: Path, device: torch.device, size=(256, 128)) -> None:
    for name in ("osnet-like", "resnet18"):
        native = build(name, size).requires_grad_(False)
        for opset, dynamic in ((13, True), (9, False)):
            path = folder / f"{name}{opset}.onnx"
            export(name, native.cpu(), size, path, opset=opset, dynamic=dynamic)
            converted = load_onnx_model(path, {"input_size": list(size)}).graph.to(device)
            native = native.to(device)
            for batch in (1, 32):
                x = torch.rand(batch, 3, *size, device=device)
                error = float((forward(converted)(x) - forward(native)(x)).abs().max())
                cosine = float(torch.nn.functional.cosine_similarity(
                    forward_backward(native)(x).flatten(), forward_backward(converted)(x).flatten(), dim=0))
                times = [median_ms(fn, x, rounds) for fn, rounds in
                         ((forward(native), 20), (forward(converted), 20),
                          (forward_backward(native), 10), (forward_backward(converted), 10))]
                print(f"{name} opset{opset} {'dynamic' if dynamic else 'batch-1'} batch {batch}: max|diff| "
                      f"{error:.1e}, grad cos {cosine:.6f}; fwd ms native {times[0]:.2f} converted {times[1]:.2f} "
                      f"({times[1] / times[0]:.2f}x); fwd+bwd native {times[2]:.2f} converted {times[3]:.2f} "
                      f"({times[3] / times[2]:.2f}x)", flush=True)


def main() -> None:
    warnings.simplefilter("ignore")
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    folder = Path(tempfile.mkdtemp())
    operators_on_cuda(folder, device)
    speed(folder, device)


if __name__ == "__main__":
    main()
