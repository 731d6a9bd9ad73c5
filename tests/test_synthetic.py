"""The embedded synthetic dataset: determinism, the split contract, the cache and colour statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reidbench.data import DATASETS, build_dataset
from reidbench.data import synthetic
from reidbench.data.synthetic import GENERATOR_VERSION, PRESETS, SyntheticConfig, build_synthetic
from reidbench.errors import ReIDBenchError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Never read or write the user's real cache from tests.
    monkeypatch.setenv("REIDBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A cache folder holding the tiny preset, so most tests load it instead of regenerating."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def tiny(tiny_root):
    return build_synthetic(root=tiny_root, preset="tiny")


def _subsets(split):
    return {"train": split.train, "query": split.query, "gallery": split.gallery}


def test_registered_under_its_name(tiny, tiny_root):
    assert DATASETS.get("synthetic") is build_synthetic
    split = build_dataset("synthetic", root=tiny_root, preset="tiny")
    assert split.name == "synthetic"
    assert torch.equal(split.query.images, tiny.query.images)


def test_same_seed_gives_identical_tensors(tiny):
    again = build_synthetic(preset="tiny", seed=0, cache=False)
    for name, part in _subsets(tiny).items():
        other = _subsets(again)[name]
        assert torch.equal(part.images, other.images), name
        assert torch.equal(part.pids, other.pids), name
        assert torch.equal(part.camids, other.camids), name


def test_different_seed_gives_different_data(tiny):
    other = build_synthetic(preset="tiny", seed=1, cache=False)
    n = min(len(tiny.train), len(other.train))
    assert not torch.equal(tiny.train.images[:n], other.train.images[:n])
    assert other.split_hash != tiny.split_hash


def test_shapes_dtypes_and_ranges(tiny):
    cfg = PRESETS["tiny"]
    assert tiny.image_size == (cfg.height, cfg.width)
    for name, part in _subsets(tiny).items():
        assert part.images.dtype == torch.uint8, name
        assert part.images.shape[1:] == (3, cfg.height, cfg.width), name
        assert part.pids.dtype == torch.int64 and part.camids.dtype == torch.int64, name
        assert len(part) > 0, name
        assert 0 <= int(part.camids.min()) and int(part.camids.max()) < cfg.num_cameras, name
        # Images use the dynamic range instead of being flat or saturated.
        assert part.images.float().std() > 20, name
    assert tiny.train.num_ids == cfg.num_train_ids
    assert torch.unique(torch.cat([tiny.query.pids, tiny.gallery.pids])).numel() == cfg.num_test_ids


def test_images_per_identity_follow_the_config(tiny):
    cfg = PRESETS["tiny"]
    pids = torch.cat([tiny.train.pids, tiny.query.pids, tiny.gallery.pids])
    _, counts = torch.unique(pids, return_counts=True)
    assert int(counts.min()) >= cfg.images_per_id[0] and int(counts.max()) <= cfg.images_per_id[1]


def test_train_and_test_identities_are_disjoint(tiny):
    train = set(tiny.train.pids.tolist())
    test = set(tiny.query.pids.tolist()) | set(tiny.gallery.pids.tolist())
    assert not train & test
    assert set(tiny.query.pids.tolist()) == set(tiny.gallery.pids.tolist())


def test_every_query_has_a_cross_camera_positive(tiny):
    q, g = tiny.query, tiny.gallery
    positive = (q.pids[:, None] == g.pids[None, :]) & (q.camids[:, None] != g.camids[None, :])
    assert positive.any(dim=1).all()


def test_exactly_one_query_per_test_identity_and_camera(tiny):
    q, g = tiny.query, tiny.gallery
    query_pairs = list(zip(q.pids.tolist(), q.camids.tolist()))
    assert len(query_pairs) == len(set(query_pairs))
    seen = set(query_pairs) | set(zip(g.pids.tolist(), g.camids.tolist()))
    assert set(query_pairs) == seen
    assert len(set(q.camids[q.pids == q.pids[0]].tolist())) >= 2


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("REIDBENCH_CACHE", str(tmp_path))
    first = build_synthetic(preset="tiny", seed=3)
    files = list((tmp_path / "synthetic").glob("*.pt"))
    assert len(files) == 1 and (tmp_path / "synthetic" / f"{files[0].name}.check").is_file()
    name = files[0].name
    assert "tiny" in name and "seed3" in name and f"v{GENERATOR_VERSION}" in name
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "synthetic").iterdir())

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached copy should have been loaded")

    monkeypatch.setattr(synthetic, "generate", no_generation)
    second = build_synthetic(preset="tiny", seed=3)
    for name, part in _subsets(first).items():
        assert torch.equal(part.images, _subsets(second)[name].images), name
        assert torch.equal(part.pids, _subsets(second)[name].pids), name
    assert second.split_hash == first.split_hash
    with pytest.raises(AssertionError, match="cached copy"):
        build_synthetic(preset="tiny", seed=3, cache=False)


def test_root_overrides_the_cache_folder(tiny, tiny_root, tmp_path):
    assert len(list(tiny_root.glob("tiny-seed0-*.pt"))) == 1
    assert not (tmp_path / "cache").exists()


def test_a_corrupt_cache_file_is_regenerated(tiny, tiny_root, tmp_path):
    (cached,) = tiny_root.glob("*.pt")
    (tmp_path / cached.name).write_bytes(b"not a torch file")
    split = build_synthetic(root=tmp_path, preset="tiny")
    assert torch.equal(split.train.images, tiny.train.images)
    assert synthetic._load_cached(tmp_path / cached.name) is not None  # rebuilt, and loads


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(ReIDBenchError, match="did you mean 'small'"):
        build_synthetic(preset="smal", cache=False)


def test_unknown_and_invalid_options_are_user_errors():
    with pytest.raises(ReIDBenchError, match="num_test_ids"):
        build_synthetic(preset="tiny", num_test_idz=3, cache=False)
    with pytest.raises(ReIDBenchError, match="cameras_per_id"):
        build_synthetic(preset="tiny", cameras_per_id=(1, 3), cache=False)


def test_overrides_apply_on_top_of_the_preset():
    split = build_synthetic(preset="tiny", num_test_ids=5, cameras_per_id=[2, 2], cache=False)
    assert torch.unique(split.query.pids).numel() == 5
    assert len(split.query) == 10


def test_split_hash_is_stable_and_fingerprints_the_generator(tiny, tiny_root, monkeypatch):
    assert build_synthetic(root=tiny_root, preset="tiny").split_hash == tiny.split_hash
    digest = synthetic._config_digest
    assert tiny.split_hash == digest(PRESETS["tiny"], 0)
    assert digest(PRESETS["small"], 0) != digest(PRESETS["tiny"], 0)
    assert digest(dataclasses.replace(PRESETS["tiny"], occlusion=0.5), 0) != digest(PRESETS["tiny"], 0)
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    assert digest(PRESETS["tiny"], 0) != tiny.split_hash


def test_info_describes_the_split(tiny):
    assert tiny.info["preset"] == "tiny"
    assert tiny.info["train_ids"] == PRESETS["tiny"].num_train_ids
    assert tiny.info["query_images"] == len(tiny.query)
    assert "tiny" in tiny.info["description"]


def _person_chroma(images: torch.Tensor) -> torch.Tensor:
    """Mean chromatic colour (RGB minus its gray level) of the central strip, where the person stands."""
    h, w = images.shape[-2:]
    centre = images[:, :, h // 5: h * 4 // 5, w * 3 // 8: w * 5 // 8].float()
    mean = centre.mean(dim=(2, 3))
    return mean - mean.mean(dim=1, keepdim=True)


def test_colour_identifies_people_better_than_it_varies_across_cameras(tiny):
    chroma, pids = _person_chroma(tiny.train.images), tiny.train.pids
    ids = torch.unique(pids)
    centroids = torch.stack([chroma[pids == i].mean(0) for i in ids])
    within = torch.cat([(chroma[pids == i] - centroids[k]).norm(dim=1) for k, i in enumerate(ids)]).mean()
    between = torch.cdist(centroids, centroids)[~torch.eye(len(ids), dtype=torch.bool)].mean()
    assert between > 1.5 * within


def test_colour_alone_does_not_identify_people():
    # With a short palette some identities share their dominant upper-body colour.
    cfg = PRESETS["small"]
    uppers = torch.from_numpy(np.stack([
        synthetic.sample_identity(synthetic._rng(0, synthetic._IDENTITY_STREAM, pid), cfg).upper
        for pid in range(cfg.num_train_ids)
    ]))
    has_lookalike = (torch.cdist(uppers, uppers) < 0.15).sum(dim=1) > 1
    assert has_lookalike.float().mean() > 0.5


# --- the long-tailed, camera-dominated preset (what DDID's balancing answers) ---------------
def _dominant_share(subset):
    shares = []
    for pid in torch.unique(subset.pids):
        _, per_camera = torch.unique(subset.camids[subset.pids == pid], return_counts=True)
        shares.append(float(per_camera.max()) / float(per_camera.sum()))
    return torch.tensor(shares)


def test_the_presets_made_before_the_long_tail_keep_their_split_hash():
    # Recorded from generator version 1: new fields at their original value change no hash.
    expected = {"tiny": "b17b2025fa439fa3", "small": "6a45fffacaced72f", "medium": "da8111e25bc4e149",
                "large": "b4bb0639dd73a64c"}
    assert {name: synthetic._config_digest(PRESETS[name], 0) for name in expected} == expected
    assert synthetic._config_digest(PRESETS["tiny-longtail"], 0) not in expected.values()


def test_the_long_tailed_preset_is_long_tailed_and_camera_dominated(tiny):
    longtail = build_synthetic(preset="tiny-longtail")
    cfg = PRESETS["tiny-longtail"]
    pids = torch.cat([longtail.train.pids, longtail.query.pids, longtail.gallery.pids])
    _, counts = torch.unique(pids, return_counts=True)
    assert int(counts.min()) >= cfg.images_per_id[0] and int(counts.max()) <= cfg.images_per_id[1]
    assert int(counts.max()) >= 3 * int(counts.min())
    assert float(counts.float().median()) < float(counts.float().mean())  # a right tail
    assert _dominant_share(longtail.train).mean() > _dominant_share(tiny.train).mean() + 0.1
    # the split contract holds: a query per (identity, camera), each with a cross-camera positive
    q, g = longtail.query, longtail.gallery
    assert ((q.pids[:, None] == g.pids[None, :]) & (q.camids[:, None] != g.camids[None, :])).any(1).all()
    assert len(set(zip(q.pids.tolist(), q.camids.tolist()))) == len(q)


def test_ddid_balancing_has_more_to_do_on_the_long_tail(tiny):
    from defenses.ddid.balance import plan_balance

    longtail = build_synthetic(preset="tiny-longtail")
    balanced, skewed = plan_balance(tiny.train.pids, tiny.train.camids), plan_balance(longtail.train.pids, longtail.train.camids)
    per_id = lambda plan, split: (len(plan) - plan.diversify) / len(torch.unique(split.train.pids))  # noqa: E731
    assert per_id(skewed, longtail) > 3 * per_id(balanced, tiny)
    assert skewed.diversify > balanced.diversify


def test_uneven_layout_options_are_checked():
    with pytest.raises(ReIDBenchError, match="dominant_camera"):
        SyntheticConfig(dominant_camera=1.0)
    with pytest.raises(ReIDBenchError, match="images_per_id"):
        SyntheticConfig(images_per_id=(3, 20), images_per_id_tail=1.0)
