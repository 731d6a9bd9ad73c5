"""Video and visible-infrared data: the synthetic-vi generator, tracklet subsets, the
cross-modality directions, and the HITSZ-VCM / SYSU-MM01 / RegDB loaders on fake folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_market import write_image

from reidbench.data import build_dataset
from reidbench.data.split import INFRARED, VISIBLE, ReIDSubset, TrackletSubset, frame_positions
from reidbench.data.synthetic_vi import VI_PRESETS, generate_vi, render_frame, tracklet_nuisances
from reidbench.data import synthetic, synthetic_vi
from reidbench.errors import ReIDBenchError
from reidbench.metrics import evaluate_rank

MICRO = dataclasses.replace(VI_PRESETS["tiny"], num_train_ids=2, num_test_ids=2, frames=3)


@pytest.fixture(autouse=True)
def no_data_roots(monkeypatch):
    monkeypatch.delenv("REIDBENCH_DATA", raising=False)


# --------------------------------------------------------------------------- synthetic-vi


def test_generator_is_deterministic_under_a_seed():
    a, b, c = generate_vi(MICRO, seed=3), generate_vi(MICRO, seed=3), generate_vi(MICRO, seed=4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["train_images"], c["train_images"])


def test_infrared_look_is_grey_warm_body_on_cool_background():
    cfg = VI_PRESETS["tiny"]
    person = synthetic.sample_identity(np.random.default_rng(0), cfg)
    camera = synthetic.sample_camera(np.random.default_rng(1), cfg)
    nuisance = dataclasses.replace(synthetic.sample_nuisance(np.random.default_rng(2), cfg, camera), shift=0.0,
                                   occluder=None)
    thermal = synthetic_vi.thermal_identity(person, synthetic_vi.sample_thermal(np.random.default_rng(3), person))
    ir_camera = synthetic_vi.infrared_camera(np.random.default_rng(4), cfg, camera)
    size = (cfg.height, cfg.width)
    visible = render_frame(person, camera, nuisance, size, infrared=False).astype(float)
    infrared = render_frame(thermal, ir_camera, nuisance, size, infrared=True).astype(float)
    assert np.array_equal(infrared[..., 0], infrared[..., 1]) and np.array_equal(infrared[..., 0], infrared[..., 2])
    assert np.abs(visible[..., 0] - visible[..., 2]).mean() > 3  # colour is there in the visible frame ...
    assert np.abs(visible - infrared).mean() > 20  # ... and the infrared frame looks otherwise
    torso = infrared[26:34, 13:19, 0].mean()  # chest of a centred person
    background = np.concatenate([infrared[:6, :5, 0].ravel(), infrared[:6, -5:, 0].ravel()]).mean()
    assert torso > background + 60
    # Colour is lost: another shirt colour with the same thermal signature is the same infrared person.
    recoloured = dataclasses.replace(person, upper=np.array([0.9, 0.1, 0.1]))
    thermal_again = synthetic_vi.thermal_identity(recoloured, synthetic_vi.sample_thermal(np.random.default_rng(3), person))
    assert np.array_equal(render_frame(thermal_again, ir_camera, nuisance, size, True), infrared.astype(np.uint8))


def test_tracklets_have_t_frames_with_motion(tiny_vi_split):
    split = tiny_vi_split
    clip = split.train.load(torch.arange(3))
    assert clip.shape == (3, 4, 3, 64, 32) and split.train.seq_len == 4
    steps = (clip[:, 1:] - clip[:, :-1]).abs().mean(dim=(2, 3, 4))
    assert bool((steps > 0.01).all())  # every frame differs from the previous one
    cfg = VI_PRESETS["tiny"]
    camera = synthetic.sample_camera(np.random.default_rng(0), cfg)
    frames = tracklet_nuisances(np.random.default_rng(5), dataclasses.replace(cfg, frames=6), camera)
    assert len(frames) == 6
    assert len({f.view for f in frames}) == 1 and len({f.horizon for f in frames}) == 1  # one occurrence
    assert len({round(f.stance, 6) for f in frames}) > 1 and len({round(f.shift, 6) for f in frames}) > 1


def test_every_test_identity_is_filmed_in_both_modalities_and_queried_across_cameras(tiny_vi_split):
    split = tiny_vi_split
    assert split.info["kind"] == "video" and split.info["direction"] == "infrared-to-visible"
    assert bool((split.query.modality == INFRARED).all()) and bool((split.gallery.modality == VISIBLE).all())
    assert set(split.train.pids.tolist()).isdisjoint(split.query.pids.tolist())
    dist = torch.rand(len(split.query), len(split.gallery))
    result = evaluate_rank(dist, split.query.pids, split.gallery.pids, split.query.camids, split.gallery.camids)
    assert result.num_valid == len(split.query)  # every query keeps a match on another camera


def test_synthetic_image_dataset_is_untouched(tiny_split):
    # the image generator's version, and hence every cached synthetic split and result, is unchanged
    assert synthetic.GENERATOR_VERSION == 1 and "kind" not in tiny_split.info and tiny_split.query.modality is None


# --------------------------------------------------------------------------- tracklet subsets and directions


def test_frame_positions_subsample_long_and_repeat_short_tracklets():
    assert frame_positions(24, 6) == [2, 6, 10, 14, 18, 22]
    assert frame_positions(3, 6) == [0, 0, 1, 1, 2, 2]
    assert frame_positions(5, 1) == [2]


def test_tracklet_subset_groups_frames_and_materializes_only_used_frames():
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 4, 2).contiguous()
    frames = ReIDSubset(pids=[5, 5, 5, 9, 9, 9, 9], camids=[0] * 3 + [1] * 4, images=images,
                        modality=[1, 1, 1, 0, 0, 0, 0], tracklet=[7, 7, 7, 2, 2, 2, 2])
    subset = TrackletSubset.from_frames(frames, seq_len=2)
    assert subset.pids.tolist() == [5, 9] and subset.modality.tolist() == [1, 0]
    assert subset.index.tolist() == [[0, 2], [4, 6]]
    loaded = subset.load_uint8(size=(8, 4))
    assert loaded.shape == (2, 2, 3, 8, 4) and loaded[1, 1, 0, 0, 0] == 6
    small = subset.materialize((4, 2))
    assert len(small.frames) == 4 and torch.equal(small.load_uint8(), subset.load_uint8())


def test_visible_to_infrared_swaps_query_and_gallery(tiny_vi_split):
    v2i = build_dataset("synthetic-vi", preset="tiny", direction="visible-to-infrared")
    i2v = build_dataset("synthetic-vi", preset="tiny", direction="infrared-to-visible")
    assert torch.equal(v2i.query.pids, tiny_vi_split.gallery.pids) and bool((v2i.query.modality == VISIBLE).all())
    assert i2v.split_hash == tiny_vi_split.split_hash != v2i.split_hash
    assert v2i.info["direction"] == "visible-to-infrared"


def test_cross_modality_direction_needs_modality_labels():
    with pytest.raises(ReIDBenchError, match="dataset 'synthetic' has no modality labels .* 'visible-to-infrared'"):
        build_dataset("synthetic", preset="tiny", direction="visible-to-infrared")
    with pytest.raises(ReIDBenchError, match="unknown cross-modality direction 'rgb2ir'"):
        build_dataset("synthetic-vi", preset="tiny", direction="rgb2ir")


# --------------------------------------------------------------------------- HITSZ-VCM


def vcm_layout(base: Path) -> Path:
    """Train: pid 1 with an infrared and a visible 3-frame tracklet and a 1-frame one; test:
    pid 2 infrared cam 1 / visible cam 2, pid 3 infrared and visible both on cam 1."""

    def tracks(folder, rows):
        names, lines = [], []
        for modality, pid, cam in rows:
            start = len(names) + 1
            count = 1 if (modality, pid, cam) == (2, 1, 3) else 3
            for f in range(count):
                name = f"{pid:04d}M{modality}D{cam}T{start:03d}F{f + 1:03d}.jpg"
                names.append(name)
                write_image(base / folder / f"{pid:04d}" / ("ir" if modality == 1 else "rgb") / f"D{cam}" / f"{f + 1:03d}.jpg")
            lines.append(f"{modality} {start} {len(names)} {pid} {cam}")
        return names, lines

    (base / "info").mkdir(parents=True)
    for part, folder, rows in (("train", "Train", [(1, 1, 1), (2, 1, 2), (2, 1, 3)]),
                               ("test", "Test", [(1, 2, 1), (2, 2, 2), (1, 3, 1), (2, 3, 1)])):
        names, lines = tracks(folder, rows)
        (base / "info" / f"{part}_name.txt").write_text("\n".join(names) + "\n")
        (base / "info" / f"track_{part}_info.txt").write_text("\n".join(lines) + "\n")
    (base / "info" / "query_IDX.txt").write_text("1 3\n")
    return base


def test_hitsz_vcm_loader_and_its_camera_filter(tmp_path):
    vcm_layout(tmp_path / "HITSZ-VCM")
    split = build_dataset("hitsz-vcm", root=tmp_path, seq_len=4, min_seq_len=2)
    assert split.info["kind"] == "video" and len(split.train) == 2  # the 1-frame tracklet is dropped
    assert split.train.modality.tolist() == [INFRARED, VISIBLE] and split.train.seq_len == 4
    assert split.query.pids.tolist() == [2, 3] and bool((split.query.modality == INFRARED).all())
    assert split.gallery.camids.tolist() == [2, 1]
    assert split.query.load(torch.arange(2), (8, 4)).shape == (2, 4, 3, 8, 4)
    assert split.train.paths[0].endswith("Train/0001/ir/D1/001.jpg")
    dist = torch.zeros(2, 2)
    # pid 3's only visible tracklet is from its own camera: removed, as the reference evaluation does
    assert evaluate_rank(dist, split.query.pids, split.gallery.pids, split.query.camids, split.gallery.camids).num_valid == 1
    v2i = build_dataset("hitsz-vcm", root=tmp_path, seq_len=4, min_seq_len=2, direction="visible-to-infrared")
    assert bool((v2i.query.modality == VISIBLE).all()) and v2i.gallery.pids.tolist() == [2, 3]


def test_hitsz_vcm_incomplete_folders_say_what_is_missing(tmp_path):
    base = vcm_layout(tmp_path / "HITSZ-VCM")
    (base / "Test" / "0002" / "ir" / "D1" / "002.jpg").unlink()
    with pytest.raises(ReIDBenchError, match=r"^1 images listed in .*test_name\.txt are missing, e\.g\. .*002\.jpg$"):
        build_dataset("hitsz-vcm", root=tmp_path, min_seq_len=2)
    (base / "info" / "query_IDX.txt").unlink()
    with pytest.raises(ReIDBenchError, match=r"HITSZ-VCM is incomplete, it lacks info/query_IDX\.txt \("):
        build_dataset("hitsz-vcm", root=tmp_path)
    (base / "info" / "query_IDX.txt").write_text("9\n")
    with pytest.raises(ReIDBenchError, match=r"query rows must lie in 1\.\.4"):
        build_dataset("hitsz-vcm", root=tmp_path, min_seq_len=2)


# --------------------------------------------------------------------------- SYSU-MM01


def sysu_layout(base: Path) -> Path:
    """Train ids 1, 2 (+ val 3) on every camera; test id 4: infrared cam 3, visible cam 2 (the
    same room); test id 5: infrared cam 6, visible cams 1 and 4. Two images per folder."""
    (base / "exp").mkdir(parents=True)
    (base / "exp" / "train_id.txt").write_text("1,2\n")
    (base / "exp" / "val_id.txt").write_text("3\n")
    (base / "exp" / "test_id.txt").write_text("4,5\n")
    folders = [(pid, cam) for pid in (1, 2, 3) for cam in range(1, 7)] + [(4, 3), (4, 2), (5, 6), (5, 1), (5, 4)]
    for pid, cam in folders:
        for i in (1, 2):
            write_image(base / f"cam{cam}" / f"{pid:04d}" / f"{i:04d}.jpg")
    for cam in range(1, 7):
        (base / f"cam{cam}").mkdir(exist_ok=True)
    return base


def test_sysu_mm01_loader_and_its_same_room_filter(tmp_path):
    sysu_layout(tmp_path / "SYSU-MM01")
    split = build_dataset("sysu-mm01", root=tmp_path)
    assert split.info["kind"] == "image" and split.train.num_ids == 3 and len(split.train) == 36
    assert split.train.modality.tolist().count(INFRARED) == 12  # cameras 3 and 6
    assert split.query.pids.tolist() == [4, 4, 5, 5] and bool((split.query.modality == INFRARED).all())
    assert sorted(zip(split.gallery.pids.tolist(), split.gallery.camids.tolist())) == [(4, 2), (5, 0), (5, 3)]
    assert split.query.camids.tolist() == [2, 2, 5, 5]  # camera 2 shares camera 3's id
    dist = torch.zeros(len(split.query), len(split.gallery))
    valid = evaluate_rank(dist, split.query.pids, split.gallery.pids, split.query.camids, split.gallery.camids).num_valid
    assert valid == 2  # camera-3 queries do not match their identity's camera-2 images
    plain = build_dataset("sysu-mm01", root=tmp_path, same_room_filter=False)
    assert evaluate_rank(dist, plain.query.pids, plain.gallery.pids, plain.query.camids, plain.gallery.camids).num_valid == 4
    indoor = build_dataset("sysu-mm01", root=tmp_path, mode="indoor", gallery_shots=2)
    assert sorted(indoor.gallery.camids.tolist()) == [0, 0, 2, 2]
    assert build_dataset("sysu-mm01", root=tmp_path, trial=0).split_hash == split.split_hash


def test_sysu_mm01_incomplete_folder_says_what_is_missing(tmp_path):
    base = sysu_layout(tmp_path / "SYSU-MM01")
    (base / "exp" / "test_id.txt").unlink()
    with pytest.raises(ReIDBenchError, match=r"SYSU-MM01 is incomplete, it lacks exp/test_id\.txt \("):
        build_dataset("sysu-mm01", root=tmp_path)
    with pytest.raises(ReIDBenchError, match="unknown sysu-mm01 mode 'outdoor'"):
        build_dataset("sysu-mm01", root=tmp_path, mode="outdoor")


# --------------------------------------------------------------------------- RegDB


def regdb_layout(base: Path, trial: int = 1) -> Path:
    (base / "idx").mkdir(parents=True)
    for part, ids in (("train", (0, 1)), ("test", (0, 1, 2))):
        for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
            lines = []
            for label in ids:
                for i in (1, 2):
                    relative = f"{folder}/{label + (0 if part == 'train' else 10)}/{part}_{modality[0]}_{label}_{i}.bmp"
                    write_image(base / relative)
                    lines.append(f"{relative} {label}")
            (base / "idx" / f"{part}_{modality}_{trial}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_regdb_loader(tmp_path):
    regdb_layout(tmp_path / "RegDB", trial=2)
    split = build_dataset("regdb", root=tmp_path, trial=2)
    assert len(split.train) == 8 and split.train.modality.tolist() == [VISIBLE] * 4 + [INFRARED] * 4
    assert bool((split.query.modality == INFRARED).all()) and bool((split.query.camids == 1).all())
    assert len(split.gallery) == 6 and bool((split.gallery.camids == 0).all())
    dist = torch.rand(len(split.query), len(split.gallery))
    assert evaluate_rank(dist, split.query.pids, split.gallery.pids, split.query.camids,
                         split.gallery.camids).num_valid == 6  # nothing is filtered
    v2i = build_dataset("regdb", root=tmp_path, trial=2, direction="visible-to-infrared")
    assert bool((v2i.query.modality == VISIBLE).all()) and len(v2i.gallery) == 6


def test_regdb_missing_lists_and_images_are_one_line_errors(tmp_path):
    base = regdb_layout(tmp_path / "RegDB")
    (base / "idx" / "test_thermal_1.txt").rename(base / "idx" / "test_thermal_1.bak")
    with pytest.raises(ReIDBenchError, match=r"RegDB is incomplete, it lacks idx/test_thermal_1\.txt \("):
        build_dataset("regdb", root=tmp_path)
    (base / "idx" / "test_thermal_1.bak").rename(base / "idx" / "test_thermal_1.txt")
    with pytest.raises(ReIDBenchError, match=r"regdb not found: no folder with idx/train_visible_3\.txt, "):
        build_dataset("regdb", root=tmp_path, trial=3)
    (base / "Thermal" / "12" / "test_t_2_1.bmp").unlink()
    with pytest.raises(ReIDBenchError, match=r"^1 images listed in .*test_thermal_1\.txt are missing"):
        build_dataset("regdb", root=tmp_path)
    with pytest.raises(ReIDBenchError, match="trial must be 1..10"):
        build_dataset("regdb", root=tmp_path, trial=0)
