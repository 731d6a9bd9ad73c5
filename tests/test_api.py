"""reidbench.benchmark: a model object, an ONNX file or a zoo id, through the same runner."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import reidbench
from reidbench.cli import main
from reidbench.errors import ReIDBenchError
from reidbench.protocol import CURRENT_VERSION

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "synthetic", "preset": "tiny"}


class Embedder(nn.Module):
    """A small CNN: normalised 3x64x32 images in, 16-d embeddings out."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((4, 2)), nn.Flatten(),
                                 nn.Linear(64, 16))
        self.seen = []

    def forward(self, x):
        self.seen.append((float(x.detach().min()), float(x.detach().max())))
        return self.net(x)


def test_a_module_runs_through_the_runner_and_returns_a_frame(tmp_path):
    net = Embedder()
    frame = reidbench.benchmark(net, dataset=TINY, attacks=["m-fgsm", "m-ifgsm"], eps=5, input_size=(64, 32),
                                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu", results=tmp_path,
                                rerank=False, progress=False)
    assert list(frame.index) == ["clean", "m-fgsm-eps5", "m-ifgsm-eps5", "worst case (eps 5)"]
    assert frame.loc["worst case (eps 5)", "mAP"] <= frame.loc[["m-fgsm-eps5", "m-ifgsm-eps5"], "mAP"].min() + 1e-9
    assert frame.loc["m-ifgsm-eps5", "mAP"] < frame.loc["clean", "mAP"]
    assert min(lo for lo, _ in net.seen) < -1.0 and max(hi for _, hi in net.seen) > 1.0  # (x - 0.5) / 0.25 reached it
    (folder,) = (tmp_path / CURRENT_VERSION / "synthetic").iterdir()
    assert re.fullmatch(r"embedder-[0-9a-f]{8}", folder.name)
    record = json.loads((folder / "m-ifgsm-eps5.json").read_text())
    assert record["model"]["backbone"] == "Embedder (Python)" and record["model"]["weights_sha256"].startswith(
        folder.name.split("-")[1])
    assert record["model"]["model"] == {"input_size": [64, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    assert record["attacked"]["mAP"] == pytest.approx(frame.loc["m-ifgsm-eps5", "mAP"])

    # Unchanged inputs: the cells are reused; other weights are another model.
    before = (folder / "m-ifgsm-eps5.json").stat().st_mtime_ns
    again = reidbench.benchmark(Embedder(), dataset=TINY, attacks=["m-ifgsm"], eps=5, input_size=(64, 32),
                                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu", results=tmp_path,
                                rerank=False, progress=False)
    assert (folder / "m-ifgsm-eps5.json").stat().st_mtime_ns == before
    assert again.loc["m-ifgsm-eps5", "mAP"] == frame.loc["m-ifgsm-eps5", "mAP"]
    reidbench.benchmark(Embedder(seed=1), dataset=TINY, attacks=["m-fgsm"], input_size=(64, 32), device="cpu",
                        results=tmp_path, rerank=False, progress=False, name="mine", queries=10)
    assert (tmp_path / CURRENT_VERSION / "synthetic" / "mine" / "m-fgsm-eps5-q10.json").is_file()


class WrongShape(nn.Module):
    def forward(self, x):
        return x.mean(1, keepdim=True)  # (B, 1, H, W): a feature map, not an embedding


@pytest.mark.parametrize("bad, message", [
    (WrongShape(), r"model 'WrongShape' returned shape \(2, 1, 64, 32\) for a batch of 2 images of 3x64x32; "
                   r"it must return \(batch, D\) embeddings"),
    (nn.Linear(5, 3), r"model 'Linear' fails on a batch of 2 images of 3x64x32: RuntimeError: "),
])
def test_a_model_with_the_wrong_output_is_one_line(bad, message, tmp_path):
    with pytest.raises(ReIDBenchError, match=message) as info:
        reidbench.benchmark(bad, dataset=TINY, attacks=["m-fgsm"], input_size=(64, 32), device="cpu", results=tmp_path)
    assert "\n" not in str(info.value)
    assert not tmp_path.joinpath(CURRENT_VERSION).exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": None}, "say which dataset"),
    ({"input_size": None}, r"input_size=\(H, W\)"),
    ({"input_size": (64,)}, "input_size must be two positive integers"),
    ({"mean": (0.5, 0.5, 0.5)}, "give both mean and std"),
    ({"std": (1, 0, 1), "mean": (0, 0, 0)}, "std must be positive"),
    ({"eps": 0}, "eps is in 1/255 units"),
    ({"queries": 0}, "queries must be a positive number"),
    ({"queries": 10_000}, "--queries 10000: dataset 'synthetic' has"),
    ({"attacks": ["m-fgsmm"]}, "unknown attack 'm-fgsmm'"),
    ({"dataset": "synthetc"}, "unknown dataset 'synthetc'"),
])
def test_bad_arguments_are_one_line(kwargs, message, tmp_path):
    arguments = dict(dataset=TINY, attacks=["m-fgsm"], input_size=(64, 32), device="cpu", results=tmp_path,
                     progress=False)
    arguments.update(kwargs)
    with pytest.raises(ReIDBenchError, match=message) as info:
        reidbench.benchmark(Embedder(), **arguments)
    assert "\n" not in str(info.value)


def test_a_zoo_id_runs_its_entry(tiny_zoo_file, tiny_model, tmp_path):
    frame = reidbench.benchmark("tiny-none", zoo=tiny_zoo_file, attacks=["m-fgsm"], device="cpu", results=tmp_path,
                                rerank=False, progress=False)
    assert (tmp_path / CURRENT_VERSION / "synthetic" / "tiny-none" / "m-fgsm-eps5.json").is_file()
    assert frame.loc["clean", "mAP"] > 0.3  # a trained model (chance is far lower on 12 identities)
    with pytest.raises(ReIDBenchError, match="is a zoo entry, which states its own input_size"):
        reidbench.benchmark("tiny-none", zoo=tiny_zoo_file, input_size=(64, 32))


def test_the_cli_runs_an_onnx_file_without_a_zoo_entry(tmp_path, capsys):
    pytest.importorskip("onnx")
    net = Embedder().eval()
    path = tmp_path / "embedder.onnx"
    # The graph takes BGR in 0..255, as many exported models do; the wrapper converts.
    torch.onnx.export(net.net, (torch.rand(2, 3, 64, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], dynamic_axes={"images": {0: "batch"}})
    argv = ["run", "--onnx", str(path), "--input-size", "64", "32", "--channel-order", "BGR", "--value-range", "255",
            "--mean", "100", "110", "120", "--std", "60", "60", "60", "--dataset", "{name: synthetic, preset: tiny}",
            "--attack", "m-fgsm", "--results", str(tmp_path / "results"), "--site", str(tmp_path / "site"),
            "--device", "cpu", "--no-rerank"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "worst case" in out.out and "m-fgsm-eps5" in out.out
    (cell,) = (tmp_path / "results").rglob("*.json")
    record = json.loads(cell.read_text())
    assert cell.parent.name.startswith("embedder-") and record["model"]["backbone"] == "embedder.onnx (ONNX)"
    assert record["model"]["model"]["channel_order"] == "BGR"
    assert (tmp_path / "site" / "index.html").is_file()
    # Other preprocessing, other numbers: the cell is not reused.
    assert main(argv[:argv.index("--mean")] + argv[argv.index("--std") + 4:]) == 0
    assert json.loads(cell.read_text())["input_key"] != record["input_key"]
    assert main(argv[:3] + argv[6:]) == 2  # no --input-size
    assert "--onnx needs --dataset NAME and --input-size H W" in capsys.readouterr().err


def test_readme_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    frame = namespace["frame"]
    assert {"clean", "m-ifgsm-eps5"} <= set(frame.index)
    assert (tmp_path / "results" / CURRENT_VERSION / "synthetic" / "my-resnet18" / "m-ifgsm-eps5.json").is_file()
