"""The provenance recorded with every result (reidbench.hardware.environment)."""

import torch

from reidbench import hardware


def test_the_cpu_kernels_instruction_set_is_recorded():
    # two hosts whose kernels differ (AVX2, AVX512) train the same recipe to different weights
    assert hardware.environment()["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_the_recorded_commit_is_the_one_the_process_loaded(monkeypatch):
    """A commit that lands while a long run goes on must not be named as the code of its later cells."""
    monkeypatch.setattr(hardware, "_git_commit", lambda: "landed-later")
    assert hardware.environment()["git_commit"] == hardware._COMMIT_AT_IMPORT != "landed-later"


def test_the_cpu_model_is_recorded(monkeypatch, tmp_path):
    """The instruction set alone did not pin training (two AVX512 hosts, different weights)."""
    model = hardware.environment()["cpu_model"]
    assert model is None or (isinstance(model, str) and model)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    real = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real(p))
    assert hardware.cpu_model() == "AMD EPYC"
