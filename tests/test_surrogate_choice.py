"""benchmarks/surrogate_choice.py: the protocol's transfer attack with the surrogate swapped."""

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def choice():
    return benchmark_script("surrogate_choice")


def test_each_surrogate_crafts_its_own_transfer(choice, tiny_model, tiny_zoo_file, tmp_path, capsys):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(tiny_zoo_file.read_text() + """
- id: tiny-other
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  defense: none
  model: {input_size: [64, 32], last_stride: 1}
  recipe: {epochs: 3, batch: {p: 8, k: 4}, lr: 1.0e-3, warmup_epochs: 1, random_erasing: 0.0, seed: 1}
""")
    choice.main(["--targets", "tiny-none", "--surrogates", "tiny-other", "tiny-none", "--zoo", str(zoo), "--device", "cpu"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-")]
    assert len(rows) == 1  # a model is never its own surrogate
    target, surrogate, own_clean, sha, clean, attacked = [c.strip() for c in rows[0].strip("|").split("|")][:6]
    assert (target, surrogate) == ("tiny-none", "tiny-other") and len(sha) == 9
    assert float(attacked.split()[0]) <= float(clean.split()[0])


def test_an_unknown_model_is_one_line(choice, tiny_zoo_file):
    with pytest.raises(SystemExit, match="^error: .*nope"):
        choice.main(["--targets", "tiny-none", "--surrogates", "nope", "--zoo", str(tiny_zoo_file), "--device", "cpu"])
