"""Which CPU settings pay on this machine: memory format, batch size and grad mode for the
three kinds of pass the benchmark spends its time in.

- attack pass: forward + input-gradient backward in eval mode (every white-box iteration);
- inference: forward only (clean features, the rank oracle, scoring adversarial images);
- training step: train-mode forward + weight backward + SGD step (every recipe).

Each setting is measured on the default suite's network and on the Market CPU network, with
the configurations interleaved and repeated (median of ``--repeats``), so that a load change
during the run hits every configuration alike; the table gives images per second and the ratio
to the reference (contiguous memory, batch 128, ``torch.no_grad``) measured in the same run.

    python benchmarks/bench_cpu_settings.py            # prints the markdown table
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MODELS = {"default": "resnet18w24-synthetic-none", "market-cpu": "mobilenetv2-market1501-trainsplit-none"}


def _model(entry_id: str):
    from reidbench.models import build_model
    from reidbench.zoo import DEFAULT_ZOO, load_zoo

    entry = load_zoo(DEFAULT_ZOO)[entry_id]
    return build_model(entry.model_spec(), num_classes=100), tuple(entry.model["input_size"])


def _pass(kind: str, model, x: torch.Tensor, grad_mode, optimizer=None) -> None:
    if kind == "attack":
        xv = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xv).sum(), xv)
    elif kind == "inference":
        with grad_mode():
            model(x)
    else:
        logits, _ = model(x)
        optimizer.zero_grad(set_to_none=True)
        logits.logsumexp(1).mean().backward()
        optimizer.step()


def configurations(kind: str) -> list[tuple[str, int, bool, object]]:
    """(label, batch, channels_last, grad mode); the first one is the reference."""
    batches = (64,) if kind == "train" else (128, 512)
    rows = []
    for batch in batches:
        for channels_last in (False, True):
            modes = (torch.no_grad, torch.inference_mode) if kind == "inference" else (torch.no_grad,)
            for mode in modes:
                label = f"batch {batch}, {'channels_last' if channels_last else 'contiguous'}"
                if kind == "inference":
                    label += f", {mode.__name__}"
                rows.append((label, batch, channels_last, mode))
    return rows


def measure(entry_id: str, kind: str, images: int, repeats: int) -> list[tuple[str, float]]:
    model, size = _model(entry_id)
    model.train(kind == "train")
    configs = configurations(kind)
    setups = []
    for label, batch, channels_last, mode in configs:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = model.to(memory_format=fmt)
        x = torch.rand(batch, 3, *size).contiguous(memory_format=fmt)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-4) if kind == "train" else None
        setups.append((label, batch, fmt, x, mode, optimizer))
    times = {label: [] for label, *_ in setups}
    for _ in range(repeats):
        for label, batch, fmt, x, mode, optimizer in setups:
            net = model.to(memory_format=fmt)
            passes = max(2, images // batch)
            _pass(kind, net, x, mode, optimizer)  # warm-up: oneDNN picks its kernels per shape
            started = time.perf_counter()
            for _ in range(passes):
                _pass(kind, net, x, mode, optimizer)
            times[label].append(passes * batch / (time.perf_counter() - started))
    return [(label, statistics.median(times[label])) for label, *_ in setups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="images per measurement (default 2048)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| network | pass | setting | images / s | vs reference |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models:
        for kind in ("attack", "inference", "train"):
            rows = measure(MODELS[name], kind, args.images if name == "default" else args.images // 8, args.repeats)
            reference = rows[0][1]
            for label, rate in rows:
                print(f"| {name} | {kind} | {label} | {rate:.0f} | {rate / reference:.2f} |", flush=True)


if __name__ == "__main__":
    main()
