"""Bad input ends in one line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import pytest
from PIL import Image

from reidbench.cli import main


def zoo_for(tmp_path, dataset_yaml):
    path = tmp_path / "zoo.yaml"
    path.write_text(f"""
- id: m1
  backbone: resnet10t
  dataset: {dataset_yaml}
  model: {{input_size: [64, 32]}}
  recipe: {{epochs: 1, batch: {{p: 4, k: 2}}}}
""")
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("reidbench: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def market_folder(tmp_path, names, corrupt=()):
    folder = tmp_path / "data" / "market1501-trainsplit" / "bounding_box_train"
    folder.mkdir(parents=True)
    for name in names:
        if name in corrupt:
            (folder / name).write_bytes(b"not a jpeg at all")
        else:
            Image.new("RGB", (64, 128), (120, 30, 60)).save(folder / name)
    return tmp_path / "data"


def test_missing_dataset_folder(tmp_path, capsys):
    zoo = zoo_for(tmp_path, f"{{name: market1501-trainsplit, root: {tmp_path / 'nowhere'}}}")
    assert_one_line_error(*run_cli(capsys, "eval", "--model", "m1", "--zoo", zoo), "not found")


def test_empty_dataset_folder(tmp_path, capsys):
    root = market_folder(tmp_path, [])
    zoo = zoo_for(tmp_path, f"{{name: market1501-trainsplit, root: {root}}}")
    assert_one_line_error(*run_cli(capsys, "eval", "--model", "m1", "--zoo", zoo), "no images")


def test_unparsable_file_names(tmp_path, capsys):
    root = market_folder(tmp_path, ["0002_c1s1_000451_03.jpg", "holiday.jpg"])
    zoo = zoo_for(tmp_path, f"{{name: market1501-trainsplit, root: {root}}}")
    assert_one_line_error(*run_cli(capsys, "eval", "--model", "m1", "--zoo", zoo), "holiday.jpg")


def test_corrupt_image(tmp_path, capsys):
    names = [f"{pid:04d}_c{cam}s1_00{i}_01.jpg" for pid in (2, 3, 4, 5) for cam in (1, 2) for i in (1, 2)]
    root = market_folder(tmp_path, names, corrupt={names[5]})
    zoo = zoo_for(tmp_path, f"{{name: market1501-trainsplit, root: {root}, num_train_ids: 2}}")
    assert_one_line_error(*run_cli(capsys, "eval", "--model", "m1", "--zoo", zoo), names[5])


def test_unknown_model_attack_dataset_defense_suggest_the_closest(capsys):
    assert_one_line_error(*run_cli(capsys, "run", "--model", "resnet18-synthetic-non"), "did you mean 'resnet18-synthetic-none'")
    assert_one_line_error(*run_cli(capsys, "run", "--all", "--attack", "m-ifgms"), "did you mean 'm-ifgsm'")
    assert_one_line_error(*run_cli(capsys, "train", "--defense", "none", "--dataset", "market1501-trainspilt"),
                          "did you mean 'market1501-trainsplit'")
    assert_one_line_error(*run_cli(capsys, "train", "--defense", "nnoe", "--dataset", "synthetic"), "did you mean 'none'")


def test_malformed_zoo(tmp_path, capsys):
    bad = tmp_path / "zoo.yaml"
    bad.write_text("- id: m1\n  backbone: resnet18\n  dataset: synthetic\n  epochs: 3\n")
    assert_one_line_error(*run_cli(capsys, "list", "models", "--zoo", str(bad)), "entry 'm1': unknown field 'epochs'")


def test_eps_out_of_range(capsys):
    assert_one_line_error(*run_cli(capsys, "run", "--all", "--eps", "0"), "--eps")


def test_unknown_protocol_version_is_one_line(tmp_path, capsys):
    for argv in (("run", "--all", "--protocol", "v9"), ("render", "--protocol", "v9", "--results", str(tmp_path)),
                 ("run", "--all", "--protocol", "../v1")):
        assert_one_line_error(*run_cli(capsys, *argv), "unknown protocol version", "known: v1, v2")


def test_a_missing_result_store_or_an_empty_suite_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-results"
    assert_one_line_error(*run_cli(capsys, "render", "--results", str(missing), "--site", str(tmp_path / "site")),
                          "no result store at", str(missing))
    assert not (tmp_path / "site").exists(), "an empty leaderboard was rendered for a mistyped folder"
    assert_one_line_error(*run_cli(capsys, "sweep", "--all", "--suite", "no-such-suite", "--results", str(tmp_path)),
                          "no defended zoo entry belongs to suite(s) ['no-such-suite']")


def test_no_gpu_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_line_error(*run_cli(capsys, "run", "--all", "--device", "cuda"), "no CUDA GPU")


def test_the_installed_console_script_prints_no_traceback(tmp_path):
    bad = tmp_path / "zoo.yaml"
    bad.write_text("- [unclosed\n")
    out = subprocess.run([sys.executable, "-m", "reidbench.cli", "list", "models", "--zoo", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "not valid YAML" in out.stderr
