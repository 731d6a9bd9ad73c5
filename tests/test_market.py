"""Market-style folders, MSMT17 lists and the market1501-trainsplit re-split, on tiny fake
datasets written to tmp_path (plus the real Market-1501 training folder when it is present)."""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from reidbench.data import build_dataset, files
from reidbench.data.market import load_market_folder, parse_market_name
from reidbench.data.msmt17 import load_msmt17_list
from reidbench.errors import ReIDBenchError

H, W = 16, 8


def write_image(path: Path, size: tuple[int, int] = (H, W)) -> Path:
    """A small solid-colour image whose colour depends on the file name, so images differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c = zlib.crc32(path.name.encode())
    Image.new("RGB", (size[1], size[0]), (c & 255, (c >> 8) & 255, (c >> 16) & 255)).save(path)
    return path


def market_layout(base: Path, train_ids=(2, 7), test_ids=(5, 11), cams=(1, 2, 3)) -> Path:
    """A fake Market-1501 folder with junk (-1) and distractor (0) images in the test folders."""
    for pid in train_ids:
        for cam in cams:
            write_image(base / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{pid * 100 + cam:06d}_01.jpg")
    for pid in test_ids:
        write_image(base / "query" / f"{pid:04d}_c1s1_000001_00.jpg")
        for cam in cams[1:]:
            write_image(base / "bounding_box_test" / f"{pid:04d}_c{cam}s2_000002_01.jpg")
    write_image(base / "bounding_box_test" / "-1_c3s2_000003_02.jpg")
    write_image(base / "bounding_box_test" / "0000_c2s3_000004_01.jpg")
    return base


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep the real data roots and the user's cache out of every test."""
    monkeypatch.delenv("REIDBENCH_DATA", raising=False)
    monkeypatch.setenv("REIDBENCH_CACHE", str(tmp_path / "cache"))
    workdir = tmp_path / "cwd" / "main"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)


# --------------------------------------------------------------------------- names and folders


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0002_c1s1_000451_03.jpg", (2, 0)),
        ("-1_c3s2_064169_01.jpg", (-1, 2)),
        ("0000_c6s1_002301_02.jpg", (0, 5)),
        ("1500_c6s3_086567_01.jpg", (1500, 5)),
        ("0005_c2_f0046985.jpg", (5, 1)),  # DukeMTMC-reID
        ("0001_c1_1.png", (1, 0)),  # CUHK03-NP
        ("/some/dir/0042_c8_f0123456.jpg", (42, 7)),
        (Path("0003_c4s1_000001_01.jpg"), (3, 3)),
    ],
)
def test_parse_market_name(name, expected):
    assert parse_market_name(name) == expected


@pytest.mark.parametrize("name", ["foo.jpg", "0002c1s1.jpg", "0002_s1c1.jpg", "c1_0002.jpg", "0002_c0s1_000001_01.jpg", "Thumbs.db"])
def test_parse_market_name_rejects(name):
    assert parse_market_name(name) is None


def test_load_market_folder_drops_junk_keeps_distractors(tmp_path):
    base = market_layout(tmp_path / "m")
    gallery = load_market_folder(base / "bounding_box_test")
    names = [Path(p).name for p in gallery.paths]
    assert names == sorted(names)
    assert all(isinstance(p, str) for p in gallery.paths)
    assert -1 not in gallery.pids.tolist()
    assert 0 in gallery.pids.tolist()
    assert len(gallery) == 2 * 2 + 1
    assert sorted(set(gallery.camids.tolist())) == [1, 2]  # c2, c3 and 0-based
    images = gallery.load_uint8(torch.tensor([0, 1]))
    assert images.shape == (2, 3, H, W) and images.dtype == torch.uint8


def test_load_market_folder_relabel(tmp_path):
    base = market_layout(tmp_path / "m", train_ids=(9, 3, 40))
    train = load_market_folder(base / "bounding_box_train", relabel=True)
    assert sorted(set(train.pids.tolist())) == [0, 1, 2]
    assert train.pids[0] == 0  # 0003 sorts first


def test_load_market_folder_skips_non_images_and_dotfiles(tmp_path):
    folder = tmp_path / "query"
    write_image(folder / "0001_c1s1_000001_00.jpg")
    (folder / "Thumbs.db").write_bytes(b"junk")
    (folder / "._0001_c1s1_000001_00.jpg").write_bytes(b"macOS resource fork")
    subset = load_market_folder(folder)
    assert len(subset) == 1


def test_missing_folder_error(tmp_path):
    with pytest.raises(ReIDBenchError, match=r"dataset folder not found: .*nowhere"):
        load_market_folder(tmp_path / "nowhere")


def test_empty_folder_error(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(ReIDBenchError, match=r"empty contains no images"):
        load_market_folder(folder)


def test_only_junk_error(tmp_path):
    write_image(tmp_path / "q" / "-1_c1s1_000001_00.jpg")
    with pytest.raises(ReIDBenchError, match=r"only junk images"):
        load_market_folder(tmp_path / "q")


def test_unparsable_names_error(tmp_path):
    folder = tmp_path / "train"
    write_image(folder / "0001_c1s1_000001_00.jpg")
    write_image(folder / "foo.jpg")
    write_image(folder / "person_3.png")
    with pytest.raises(ReIDBenchError) as err:
        load_market_folder(folder)
    message = str(err.value)
    assert "2 file names in" in message and str(folder) in message
    assert "PPPP_cC" in message and "'foo.jpg'" in message
    assert "\n" not in message


def test_corrupt_image_error(tmp_path):
    folder = tmp_path / "query"
    write_image(folder / "0001_c1s1_000001_00.jpg")
    bad = folder / "0002_c2s1_000001_00.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    subset = load_market_folder(folder)  # path-based: listing does not decode
    subset.load_uint8(torch.tensor([0]))
    with pytest.raises(ReIDBenchError, match=r"cannot read image .*0002_c2s1_000001_00\.jpg"):
        subset.load(torch.tensor([1]))


# --------------------------------------------------------------------------- registered datasets


def test_market1501_from_root(tmp_path):
    market_layout(tmp_path / "data" / "Market-1501-v15.09.15")
    for root in (tmp_path / "data", tmp_path / "data" / "Market-1501-v15.09.15"):
        split = build_dataset("market1501", root=root)
        assert split.train.paths is not None  # lazy by default
        assert split.image_size == (128, 64)
        assert split.info["num_train_ids"] == 2 and split.info["num_test_ids"] == 2
        assert split.info["num_query"] == 2 and split.info["num_gallery"] == 5
        assert set(split.train.pids.tolist()).isdisjoint(split.query.pids.tolist())
    assert build_dataset("market1501", root=tmp_path / "data").split_hash == split.split_hash


def test_market1501_found_via_data_roots(tmp_path, monkeypatch):
    market_layout(tmp_path / "elsewhere" / "market1501")
    monkeypatch.setenv("REIDBENCH_DATA", str(tmp_path / "elsewhere"))
    assert len(build_dataset("market1501").train) == 6
    # ./data next to the working directory is a data root too
    market_layout(Path.cwd() / "data" / "Market-1501-v15.09.15", train_ids=(1,))
    monkeypatch.delenv("REIDBENCH_DATA")
    assert len(build_dataset("market1501").train) == 3


def test_dataset_not_found_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("REIDBENCH_DATA", str(tmp_path / "custom"))
    with pytest.raises(ReIDBenchError) as err:
        build_dataset("market1501")
    message = str(err.value)
    assert message.startswith("market1501 not found")
    assert str(tmp_path / "custom" / "Market-1501-v15.09.15") in message
    assert str(Path.cwd() / "data" / "market1501") in message
    assert "REIDBENCH_DATA" in message and "\n" not in message


def test_market1501_materialized_and_resized(tmp_path):
    market_layout(tmp_path / "market1501")
    split = build_dataset("market1501", root=tmp_path, materialize=True, image_size=(8, 4))
    assert split.train.images.shape == (6, 3, 8, 4)
    assert split.gallery.images.shape == (5, 3, 8, 4)
    assert split.split_hash == build_dataset("market1501", root=tmp_path).split_hash
    assert (tmp_path / "cache" / "decoded" / f"market1501-{split.split_hash}-8x4.pt").is_file()


def test_bad_image_size(tmp_path):
    market_layout(tmp_path / "market1501")
    with pytest.raises(ReIDBenchError, match="image_size"):
        build_dataset("market1501", root=tmp_path, image_size=(0, 64))
    with pytest.raises(ReIDBenchError, match="image_size"):
        build_dataset("market1501", root=tmp_path, image_size="big")


def test_dukemtmcreid_names(tmp_path):
    base = tmp_path / "DukeMTMC-reID"
    for name in ["0001_c2_f0046182.jpg", "0001_c6_f0161236.jpg", "0005_c8_f0002424.jpg"]:
        write_image(base / "bounding_box_train" / name, size=(20, 9))
    write_image(base / "query" / "0010_c1_f0057707.jpg")
    write_image(base / "bounding_box_test" / "0010_c7_f0062545.jpg")
    write_image(base / "bounding_box_test" / "0000_c3_f0030001.jpg")
    split = build_dataset("dukemtmcreid", root=tmp_path)
    assert split.train.camids.tolist() == [1, 5, 7]
    assert split.train.pids.tolist() == [1, 1, 5]
    assert split.gallery.pids.tolist() == [0, 10]
    assert split.image_size == (256, 128)


def test_cuhk03_np_variants(tmp_path):
    for variant in ("detected", "labeled"):
        base = tmp_path / "cuhk03-np" / variant
        for name in ["0001_c1_1.png", "0001_c2_6.png"]:
            write_image(base / "bounding_box_train" / name)
        write_image(base / "query" / "0800_c1_1.png")
        write_image(base / "bounding_box_test" / "0800_c2_7.png")
    detected = build_dataset("cuhk03-np", root=tmp_path)
    labeled = build_dataset("cuhk03-np", root=tmp_path, variant="labeled")
    assert detected.info["variant"] == "detected" and labeled.info["variant"] == "labeled"
    assert "labeled" in labeled.train.paths[0] and "detected" in detected.train.paths[0]
    # same file names, different crops: the results must not share a split hash
    assert detected.split_hash != labeled.split_hash
    assert build_dataset("cuhk03-np", root=tmp_path / "cuhk03-np", variant="labeled").split_hash == labeled.split_hash
    with pytest.raises(ReIDBenchError, match=r"unknown cuhk03-np variant 'labelled'; did you mean 'labeled'"):
        build_dataset("cuhk03-np", root=tmp_path, variant="labelled")


# --------------------------------------------------------------------------- MSMT17


def msmt17_layout(base: Path) -> Path:
    lists = {
        ("train", "list_train.txt"): [("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0000/0000_001_05_0303morning_0020_1.jpg", 0)],
        ("train", "list_val.txt"): [("0001/0001_000_15_0303afternoon_0100_0.jpg", 1)],
        ("test", "list_query.txt"): [("0000/0000_000_02_0303noon_0001_0.jpg", 0)],
        ("test", "list_gallery.txt"): [
            ("0000/0000_001_03_0303noon_0002_0.jpg", 0),
            ("0001/0001_000_10_0303noon_0003_0.jpg", 1),
        ],
    }
    for (folder, list_name), entries in lists.items():
        for rel, _ in entries:
            write_image(base / folder / rel)
        # CRLF and a trailing blank line, as text files written on Windows have
        (base / list_name).write_text("".join(f"{rel} {pid}\r\n" for rel, pid in entries) + "\n")
    return base


def test_msmt17_layout(tmp_path):
    msmt17_layout(tmp_path / "MSMT17_V1")
    split = build_dataset("msmt17", root=tmp_path)
    assert len(split.train) == 3  # list_train + list_val
    assert split.train.pids.tolist() == [0, 0, 1]
    assert split.train.camids.tolist() == [0, 4, 14]
    assert split.query.camids.tolist() == [1] and split.gallery.camids.tolist() == [2, 9]
    assert split.train.paths[0] == str(tmp_path / "MSMT17_V1" / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg")
    assert split.query.paths[0].startswith(str(tmp_path / "MSMT17_V1" / "test"))
    assert split.info["version"] == "V1" and split.info["num_train_ids"] == 2
    assert split.train.load_uint8(torch.tensor([2])).shape == (1, 3, H, W)


def test_msmt17_torchreid_layout_and_v2_folders(tmp_path):
    base = msmt17_layout(tmp_path / "msmt17" / "MSMT17_V2")
    (base / "train").rename(base / "mask_train_v2")
    (base / "test").rename(base / "mask_test_v2")
    split = build_dataset("msmt17", root=tmp_path)
    assert split.info["version"] == "V2"
    assert "mask_test_v2" in split.gallery.paths[0]


def test_msmt17_malformed_line(tmp_path):
    base = msmt17_layout(tmp_path / "MSMT17_V1")
    with open(base / "list_query.txt", "a") as fh:
        fh.write("0002/0002_000_01_0303noon_0001_0.jpg\n")
    with pytest.raises(ReIDBenchError) as err:
        build_dataset("msmt17", root=tmp_path)
    message = str(err.value)
    assert f"{base / 'list_query.txt'}:3:" in message  # line 3: after the entry and the blank line
    assert "relative/path.jpg label" in message and "\n" not in message


def test_msmt17_bad_label_and_camera(tmp_path):
    base = msmt17_layout(tmp_path / "MSMT17_V1")
    (base / "bad_label.txt").write_text("0000/0000_000_01_0303noon_0001_0.jpg zero\n")
    with pytest.raises(ReIDBenchError, match=r"bad_label\.txt:1: expected"):
        load_msmt17_list(base / "bad_label.txt", base / "test")
    (base / "bad_cam.txt").write_text("0000/0000_000_01_0303noon_0001_0.jpg 0\n0000/person.jpg 0\n")
    with pytest.raises(ReIDBenchError, match=r"bad_cam\.txt:2: cannot read the camera from '0000/person\.jpg'"):
        load_msmt17_list(base / "bad_cam.txt", base / "test")


def test_msmt17_missing_image_and_list(tmp_path):
    base = msmt17_layout(tmp_path / "MSMT17_V1")
    (base / "test" / "0001" / "0001_000_10_0303noon_0003_0.jpg").unlink()
    with pytest.raises(ReIDBenchError, match=r"1 images listed in .*list_gallery\.txt are missing"):
        build_dataset("msmt17", root=tmp_path)
    (base / "list_val.txt").unlink()
    with pytest.raises(ReIDBenchError, match=r"msmt17 not found: no folder with .*list_val\.txt"):
        build_dataset("msmt17", root=tmp_path)


# --------------------------------------------------------------------------- market1501-trainsplit


def trainsplit_layout(root: Path, num_ids: int = 12) -> Path:
    """Ids 2, 5, 8, ... with 1-4 images in each of 2-3 cameras (one id in a single camera)."""
    folder = root / "market1501-trainsplit" / "bounding_box_train"
    for n in range(num_ids):
        pid = 2 + 3 * n
        cams = (1,) if n == num_ids - 1 else (1, 2, 3)[: 2 + n % 2]
        for cam in cams:
            for j in range(1 + (n + cam) % 4):
                write_image(folder / f"{pid:04d}_c{cam}s1_{j:06d}_0{j % 3 + 1}.jpg")
    return folder


def test_trainsplit_protocol(tmp_path):
    folder = trainsplit_layout(tmp_path / "data")
    split = build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=8, materialize=False)
    all_ids = sorted({parse_market_name(n)[0] for n in os.listdir(folder)})
    train_ids, test_ids = set(split.train.pids.tolist()), set(split.query.pids.tolist())
    assert train_ids == set(all_ids[:8]) and test_ids == set(all_ids[8:])
    assert set(split.gallery.pids.tolist()) <= test_ids
    # every file lands in exactly one part
    names = [Path(p).name for part in (split.train, split.query, split.gallery) for p in part.paths]
    assert sorted(names) == sorted(os.listdir(folder)) and len(set(names)) == len(names)
    # exactly one query per (test id, camera it appears in)
    test_pairs = {
        parse_market_name(n) for n in os.listdir(folder) if parse_market_name(n)[0] in test_ids
    }
    query_pairs = Counter(zip(split.query.pids.tolist(), split.query.camids.tolist()))
    assert set(query_pairs) == test_pairs and set(query_pairs.values()) == {1}
    info = split.info
    assert info["num_train_ids"] == 8 and info["num_test_ids"] == 4 and info["num_ids"] == 12
    assert info["num_query"] == len(test_pairs) and info["num_images"] == len(names)
    assert info["comparable_with_official_market1501"] is False
    # the single-camera id has a query and no cross-camera gallery image
    assert info["num_query_without_cross_camera_match"] >= 1


def test_trainsplit_deterministic_and_seeded(tmp_path):
    trainsplit_layout(tmp_path / "data", num_ids=20)
    kwargs = dict(root=tmp_path / "data", num_train_ids=5, materialize=False)
    a = build_dataset("market1501-trainsplit", **kwargs)
    b = build_dataset("market1501-trainsplit", **kwargs)
    assert a.split_hash == b.split_hash and a.query.paths == b.query.paths
    other_seed = build_dataset("market1501-trainsplit", seed=1, **kwargs)
    assert other_seed.split_hash != a.split_hash and other_seed.query.paths != a.query.paths
    other_count = build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=6, materialize=False)
    assert other_count.split_hash != a.split_hash


def test_trainsplit_bad_num_train_ids(tmp_path):
    trainsplit_layout(tmp_path / "data")
    for bad in (0, 12, 500):
        with pytest.raises(ReIDBenchError, match=r"num_train_ids must be between 1 and 11 .* got"):
            build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=bad)


def test_trainsplit_materialized_cache_round_trip(tmp_path, monkeypatch):
    trainsplit_layout(tmp_path / "data")
    cache = tmp_path / "other-cache"
    monkeypatch.setenv("REIDBENCH_CACHE", str(cache))
    lazy = build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=8, materialize=False)
    first = build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=8)
    assert first.split_hash == lazy.split_hash and first.image_size == (H, W)
    cached = cache / "decoded" / f"market1501-trainsplit-{first.split_hash}-{H}x{W}.pt"
    assert cached.is_file() and not list(cached.parent.glob("*.tmp"))
    for part in ("train", "query", "gallery"):
        images = getattr(first, part).images
        assert images.dtype == torch.uint8 and images.shape == (len(getattr(lazy, part)), 3, H, W)
        assert torch.equal(images, getattr(lazy, part).load_uint8())

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache holds it")

    monkeypatch.setattr(files, "read_image", no_decoding)
    second = build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=8)
    assert second.split_hash == first.split_hash
    for part in ("train", "query", "gallery"):
        assert torch.equal(getattr(second, part).images, getattr(first, part).images)
        assert torch.equal(getattr(second, part).pids, getattr(first, part).pids)


def test_trainsplit_resized_and_broken_cache_rebuilt(tmp_path, monkeypatch, capsys):
    trainsplit_layout(tmp_path / "data")
    split = build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=8, image_size=(8, 4))
    assert split.train.images.shape[1:] == (3, 8, 4)
    cached = tmp_path / "cache" / "decoded" / f"market1501-trainsplit-{split.split_hash}-8x4.pt"
    cached.write_bytes(b"truncated")
    monkeypatch.setenv("REIDBENCH_QUIET", "0")
    again = build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=8, image_size=(8, 4))
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "corrupt" in ln]
    assert "corrupt cached decoded dataset" in line and "rebuilding" in line
    assert torch.equal(again.query.images, split.query.images)
    assert cached.stat().st_size > 100


def test_trainsplit_corrupt_image(tmp_path):
    folder = trainsplit_layout(tmp_path / "data")
    bad = sorted(os.listdir(folder))[5]
    (folder / bad).write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ReIDBenchError, match=rf"cannot read image .*{bad}"):
        build_dataset("market1501-trainsplit", root=tmp_path / "data", num_train_ids=8)
    assert not list((tmp_path / "cache").rglob("*.pt"))


# --------------------------------------------------------------------------- the real training folder


def real_trainsplit_root() -> Path | None:
    candidates = [Path(os.environ["REIDBENCH_DATA"])] if os.environ.get("REIDBENCH_DATA") else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in candidates:
        if (root / "market1501-trainsplit" / "bounding_box_train").is_dir():
            return root
    return None


REAL_ROOT = real_trainsplit_root()  # resolved before the autouse fixture clears REIDBENCH_DATA
needs_real = pytest.mark.skipif(REAL_ROOT is None, reason="real Market-1501 training folder not present")
# Pinned so that any change to the re-split procedure is noticed: it makes results incomparable.
REAL_SPLIT_HASH = "d0769231f3e68833"


@needs_real
def test_real_trainsplit_counts():
    split = build_dataset("market1501-trainsplit", root=REAL_ROOT, materialize=False)
    info = split.info
    assert info["num_images"] == 12936 and info["num_ids"] == 751 and info["num_cameras"] == 6
    assert split.train.num_ids == 500 and split.query.num_ids == 251
    assert split.train.pids.min() == 2 and split.query.pids.max() == 1500
    pairs = {(p, c) for p, c in zip(split.gallery.pids.tolist(), split.gallery.camids.tolist())}
    pairs |= {(p, c) for p, c in zip(split.query.pids.tolist(), split.query.camids.tolist())}
    assert len(split.query) == len(pairs) == info["num_query"] == 1122
    assert len(split.train) + len(split.query) + len(split.gallery) == 12936
    assert split.split_hash == REAL_SPLIT_HASH
    assert build_dataset("market1501-trainsplit", root=REAL_ROOT, materialize=False).split_hash == REAL_SPLIT_HASH


@pytest.mark.slow
@needs_real
def test_real_trainsplit_materialized():
    start = time.perf_counter()
    cold = build_dataset("market1501-trainsplit", root=REAL_ROOT)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = build_dataset("market1501-trainsplit", root=REAL_ROOT)
    warm_s = time.perf_counter() - start
    assert cold.split_hash == warm.split_hash == REAL_SPLIT_HASH
    assert cold.image_size == (128, 64)
    assert cold.train.images.shape == (9173, 3, 128, 64)
    assert cold.query.images.shape == (1122, 3, 128, 64)
    assert cold.gallery.images.shape == (2641, 3, 128, 64)
    assert torch.equal(cold.gallery.images, warm.gallery.images)
    assert warm_s < 2.0, f"cached build took {warm_s:.1f}s (cold {cold_s:.1f}s)"
