"""Speed of the ONNX converter: the converted forward against the same network written in
torch and against onnxruntime, all three timed interleaved in the same process.

Networks: an OSNet-like net (Zhou et al., ICCV 2019: omni-scale blocks of 1x1 and depthwise
lite 3x3 convolutions in four streams, a unified aggregation gate; x1.0 widths) behind a
per-image MeanVarianceNormalization, as deployed toolkits ship it; and timm's ResNet-18 as a
ReIDModel. Weights are random (with non-trivial BatchNorm statistics): speed does not depend
on them. The exported graph has a dynamic batch; the converted forward is also timed from a
batch-1 opset-9 export of the same net, which must run at batch 32 as fast.

    python benchmarks/bench_onnx.py [--threads 1] [--repeats 7] [--batches 1 32] [--size 256 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=1, stride=1, groups=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*(layers + [nn.ReLU()] if relu else layers))


class LiteConv(nn.Sequential):
    """1x1 pointwise, then 3x3 depthwise, BN, ReLU (OSNet's Lite 3x3)."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 1, bias=False), ConvBN(cout, cout, 3, groups=cout))


class Gate(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class OSBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBN(cin, mid)
        self.streams = nn.ModuleList(nn.Sequential(*[LiteConv(mid, mid) for _ in range(t)]) for t in range(1, 5))
        self.gate = Gate(mid)
        self.expand = ConvBN(mid, cout, relu=False)
        self.shortcut = ConvBN(cin, cout, relu=False) if cin != cout else nn.Identity()

    def forward(self, x):
        y = self.reduce(x)
        y = sum(self.gate(stream(y)) for stream in self.streams)
        return torch.relu(self.expand(y) + self.shortcut(x))


class OSNetLike(nn.Module):
    """Images -> 512-d embeddings; ``standardize`` is the deployed per-image MVN."""

    def __init__(self, standardize: bool = True):
        super().__init__()
        self.standardize = standardize
        self.stem = nn.Sequential(ConvBN(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for width, last in ((256, False), (384, False), (512, True)):
            stages += [OSBlock(cin, width), OSBlock(width, width)]
            if not last:
                stages += [ConvBN(width, width), nn.AvgPool2d(2, 2)]
            cin = width
        self.stages = nn.Sequential(*stages, ConvBN(512, 512))
        self.fc = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU())

    def forward(self, x):
        if self.standardize:
            var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False, keepdim=True)
            x = (x - mean) / (var.sqrt() + 1e-9)
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def randomized(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return model.eval()


def build(name: str, size) -> nn.Module:
    torch.manual_seed(0)
    if name == "osnet-like":
        return randomized(OSNetLike())
    from reidbench.models import build_model

    return randomized(build_model({"backbone": "resnet18", "input_size": list(size)}))


def export(name: str, model: nn.Module, size, path: Path, opset: int, dynamic: bool) -> None:
    """Export; the OSNet-like net's standardization goes in as one MeanVarianceNormalization."""
    import onnx
    from onnx import helper

    body = model
    if name == "osnet-like":
        body = OSNetLike(standardize=False)
        body.load_state_dict(model.state_dict())
        body.eval()
    axes = {"images": {0: "batch"}, "embedding": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(body, (torch.rand(1, 3, *size),), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["embedding"], dynamic_axes=axes)
    if name == "osnet-like":
        proto = onnx.load(str(path))
        for node in proto.graph.node:
            node.input[:] = ["standardized" if i == "images" else i for i in node.input]
        axes_attr = {"axes": [2, 3]}  # per image even when the batch is dynamic
        proto.graph.node.insert(0, helper.make_node("MeanVarianceNormalization", ["images"], ["standardized"],
                                                    name="input_mvn", **axes_attr))
        onnx.save(proto, str(path))


def forward(model):
    def run(x):
        with torch.no_grad():
            return model(x)
    return run


def forward_backward(model):
    def run(x):
        x = x.clone().requires_grad_(True)
        model(x).sum().backward()
        return x.grad
    return run


def timed(fn, x, rounds: list[float]) -> None:
    started = time.perf_counter()
    fn(x)
    rounds.append(time.perf_counter() - started)


def measure(name: str, size, batches, repeats: int, threads: int) -> list[dict]:
    import onnx
    import onnxruntime as ort

    from reidbench.models.onnx_import import load_onnx_model

    native = build(name, size).requires_grad_(False)  # attacks need input gradients only, as converted weights
    # The converter runs CPU convolutions channels-last: so can a torch user, and that is timed too.
    native_nhwc = build(name, size).requires_grad_(False).to(memory_format=torch.channels_last)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        dynamic, batch_one = Path(folder) / "dynamic.onnx", Path(folder) / "batch1.onnx"
        export(name, native, size, dynamic, opset=13, dynamic=True)
        export(name, native, size, batch_one, opset=9, dynamic=False)
        started = time.perf_counter()
        converted = load_onnx_model(dynamic, {"input_size": list(size)}).graph
        convert_s = time.perf_counter() - started
        converted_b1 = load_onnx_model(batch_one, {"input_size": list(size)}).graph
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(dynamic), options, providers=["CPUExecutionProvider"])
        nodes = len(onnx.load(str(dynamic)).graph.node)

        def run_ort(x):
            return session.run(None, {"images": x.numpy()})[0]

        for batch in batches:
            x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                reference = native(x)
                error = max(float((converted(x) - reference).abs().max()),
                            float((converted_b1(x) - reference).abs().max()),
                            float(np.abs(run_ort(x) - reference.numpy()).max()))
            nhwc = x.contiguous(memory_format=torch.channels_last)
            fns = {"native": forward(native), "native-nhwc": lambda _: forward(native_nhwc)(nhwc),
                   "converted": forward(converted), "converted-b1": forward(converted_b1),
                   "onnxruntime": run_ort, "native-grad": forward_backward(native),
                   "converted-grad": forward_backward(converted)}
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():  # warm-up: allocator, first-call dispatch, ORT's arena
                fn(x)
            for _ in range(repeats):  # interleaved, so machine load hits all alike
                for key, fn in fns.items():
                    timed(fn, x, times[key])
            per_image = {k: 1000 * statistics.median(v) / batch for k, v in times.items()}
            rows.append({"net": name, "batch": batch, "convert_s": convert_s, "max_abs_diff": error,
                         "steps": len(converted.steps), "nodes": nodes,
                         **per_image})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| net | batch | native torch | native, channels-last | converted | converted (batch-1 export) | "
             "onnxruntime | converted / native | converted / native channels-last | converted / onnxruntime | "
             "native fwd+bwd | converted fwd+bwd | max abs diff |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['batch']} | {r['native']:.2f} | {r['native-nhwc']:.2f} | {r['converted']:.2f} | "
            f"{r['converted-b1']:.2f} | {r['onnxruntime']:.2f} | {r['converted'] / r['native']:.2f}x | "
            f"{r['converted'] / r['native-nhwc']:.2f}x | {r['converted'] / r['onnxruntime']:.2f}x | "
            f"{r['native-grad']:.2f} | {r['converted-grad']:.2f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128])
    parser.add_argument("--nets", nargs="+", default=["osnet-like", "resnet18"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for net in args.nets for row in measure(net, tuple(args.size), args.batches, args.repeats,
                                                          args.threads)]
    import onnxruntime

    print(f"milliseconds per image, median of {args.repeats} interleaved rounds; {args.threads} thread(s); "
          f"{args.size[0]}x{args.size[1]}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(table(rows))
    for r in {r["net"]: r for r in rows}.values():
        print(f"{r['net']}: {r['nodes']} ONNX nodes -> {r['steps']} torch steps; conversion {r['convert_s']:.2f} s")


if __name__ == "__main__":
    main()
