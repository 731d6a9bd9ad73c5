"""Attack strength to AutoAttack's standard (protocol v2): best iterate, restarts as a cascade
on the unbroken queries, and the protocol keys that switch them on (v1 stays as it was)."""

import pytest
import torch
import torch.nn as nn

from attacks.iterative import IterativeMetricAttack
from reidbench.attack import SurrogateView, build_attack
from reidbench.defense import DefendedModel, Defense
from reidbench.errors import ReIDBenchError
from reidbench.features import embed, extract_features
from reidbench.metrics import evaluate_rank, pairwise_distance
from reidbench.protocol import Protocol, load_protocol
from reidbench.registry import ATTACKS

from attack_setup import white_box_context

EPS, STEP = 5 / 255, 1 / 255


@pytest.fixture(scope="module")
def setting(tiny_model, tiny_split):
    queries = tiny_split.query.load(None, tuple(tiny_model.input_size))
    return tiny_model, tiny_split, queries, white_box_context(tiny_model, tiny_split)


def ranks(model, adv, ctx):
    with torch.no_grad():
        return ctx.match_rank(embed(model, adv))


def fresh(ctx, seed=0):
    batch = ctx.batch(torch.arange(len(ctx.query_pids)))
    batch.generator = torch.Generator().manual_seed(seed)
    return batch


def test_match_rank_is_the_first_hit_of_the_evaluation(setting):
    model, split, queries, ctx = setting
    with torch.no_grad():
        feats = embed(model, queries)
    result = evaluate_rank(pairwise_distance(feats, ctx.gallery_feats), ctx.query_pids, ctx.gallery_pids,
                           ctx.query_camids, ctx.gallery_camids)
    assert torch.equal(ctx.match_rank(feats).cpu(), result.per_query_first_hit.long())


@pytest.mark.parametrize("name", ["m-ifgsm", "sma", "lta"])
def test_best_iterate_never_does_worse_than_the_last_iterate_on_the_same_seed(setting, name):
    model, _, queries, ctx = setting
    last = build_attack(name, eps=EPS, step=STEP, iterations=6, seed=0)(model, queries, fresh(ctx))
    best = build_attack(name, eps=EPS, step=STEP, iterations=6, seed=0, best_iterate=True)(model, queries, fresh(ctx))
    r_last, r_best = ranks(model, last, ctx), ranks(model, best, ctx)
    valid = r_last >= 0
    assert (r_best[valid] >= r_last[valid]).all()
    assert (r_best[valid] == 0).sum() <= (r_last[valid] == 0).sum()
    assert (best - queries).abs().max() <= EPS + 1e-6


def test_best_iterate_by_loss_keeps_the_highest_loss_seen(setting):
    model, _, queries, ctx = setting
    attack = build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=4, seed=0, best_iterate=True, worst_by="loss")
    best = attack(model, queries, fresh(ctx))
    last = build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=4, seed=0)(model, queries, fresh(ctx))
    prepared = attack.prepare(model, queries, fresh(ctx))
    with torch.no_grad():
        assert (attack.loss(embed(model, best), prepared) >= attack.loss(embed(model, last), prepared) - 1e-6).all()


def test_restarts_are_a_cascade_on_the_unbroken_queries_and_keep_the_worst(setting, monkeypatch):
    model, _, queries, ctx = setting
    sizes = []
    run = IterativeMetricAttack._run

    def counting(self, model, x0, base):
        sizes.append(len(x0))
        return run(self, model, x0, base)

    monkeypatch.setattr(IterativeMetricAttack, "_run", counting)
    single = build_attack("sma", eps=EPS, step=STEP, iterations=3, seed=0, best_iterate=True)(model, queries, fresh(ctx))
    assert sizes == [len(queries)]
    unbroken_after_one = int((ranks(model, single, ctx) == 0).sum())
    assert 0 < unbroken_after_one < len(queries), "the test needs some queries left to restart"
    sizes.clear()
    cascade = build_attack("sma", eps=EPS, step=STEP, iterations=3, seed=0, best_iterate=True, restarts=3)
    adv = cascade(model, queries, fresh(ctx))
    assert sizes[0] == len(queries) and sizes[1] == unbroken_after_one
    assert len(sizes) <= 3 and all(later <= earlier for earlier, later in zip(sizes, sizes[1:]))
    r_single, r_cascade = ranks(model, single, ctx), ranks(model, adv, ctx)
    assert (r_cascade >= r_single).all()
    assert torch.equal(adv, cascade(model, queries, fresh(ctx)))  # seeded
    assert cascade.describe()["restarts"] == 3 and cascade.describe()["best_iterate"] is True


def test_a_deterministic_attack_does_not_restart(setting, monkeypatch):
    model, _, queries, ctx = setting
    sizes = []
    run = IterativeMetricAttack._run
    monkeypatch.setattr(IterativeMetricAttack, "_run", lambda self, m, x0, base: sizes.append(len(x0)) or run(self, m, x0, base))
    build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=2, seed=0, restarts=3)(model, queries[:4], fresh(ctx.batch(torch.arange(4))))
    assert sizes == [4]


def test_v1_keeps_its_attacks_and_their_descriptions():
    v1 = load_protocol("v1")
    assert v1.restarts == 1 and v1.best_iterate is False
    plain = build_attack("sma", eps=EPS, step=STEP, iterations=15)
    described = plain.describe()
    assert plain.strengthen(v1.restarts, v1.best_iterate).describe() == described
    assert not {"restarts", "best_iterate", "worst_by"} & described.keys()


def test_the_protocol_keys_reach_every_iterative_attack_of_the_runner():
    from reidbench.runner import Runner

    raw = dict(load_protocol("v1").raw, version="v2x", attack={"restarts": 3, "best_iterate": True})
    runner = Runner({}, protocol=Protocol("v2x", raw), device="cpu", progress=False)
    for name in ATTACKS.names():
        attack = runner.make_attack(name, EPS)
        if ATTACKS.get(name).strengthenable:
            assert attack.restarts == 3 and attack.best_iterate is True, name
        else:  # e.g. a universal perturbation, which has no loop to restart
            assert attack.restarts == 1 and "restarts" not in attack.describe(), name
    assert runner.make_attack("transfer", EPS).inner.restarts == 3
    with pytest.raises(ReIDBenchError, match="restarts"):
        build_attack("sma", eps=EPS, step=STEP, iterations=2).strengthen(0)


def test_bad_worst_by_is_one_line():
    with pytest.raises(ReIDBenchError, match="worst_by"):
        build_attack("sma", eps=EPS, step=STEP, iterations=2, worst_by="mAP")


# --- the oblivious attacker aims with the bare network's features ---------------------------
class _Swap(Defense):
    """A transform that changes features a lot: the colour channels reversed."""

    def input_transform(self):
        class Swap(nn.Module):
            def forward(self, x):
                return x.flip(1)

        return Swap()


def test_oblivious_computes_its_guides_with_the_bare_network(setting):
    model, split, queries, _ = setting
    index = torch.arange(6)
    defended = DefendedModel(model.model, _Swap()).eval()
    size = tuple(model.input_size)
    bare_q = extract_features(model.model, split.query, size, progress=False)
    bare_g = extract_features(model.model, split.gallery, size, progress=False)
    full = white_box_context(defended, split)
    full.bare = SurrogateView("tiny", model.model, bare_q, bare_g)
    ctx = full.batch(index)
    x = queries[index]
    adv = build_attack("oblivious", eps=EPS, step=STEP, iterations=3, inner="m-ifgsm")(defended, x, ctx)
    bare_ctx = ctx.batch(torch.arange(len(index)))
    bare_ctx.query_feats, bare_ctx.gallery_feats, bare_ctx.bare = ctx.bare.query_feats, ctx.bare.gallery_feats, None
    expected = build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=3)(model.model, x, bare_ctx)
    assert torch.equal(adv, expected)
    aimed_with_defended = build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=3)(model.model, x, ctx)
    assert not torch.equal(adv, aimed_with_defended)
    ctx.bare = None
    with pytest.raises(ReIDBenchError, match="bare network"):
        build_attack("oblivious", eps=EPS, step=STEP, iterations=1)(defended, x, ctx)


def test_the_runner_gives_the_oblivious_attack_the_bare_features(tiny_model, tiny_zoo_file, tmp_path):
    from reidbench.runner import Runner
    from reidbench.zoo import load_zoo

    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(tiny_zoo_file.read_text() + """
- id: tiny-cs
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  defense: {name: cs}
  model: {input_size: [64, 32], last_stride: 1}
  weights: {from: tiny-none}
""")
    runner = Runner(load_zoo(zoo_file), results_root=tmp_path / "results", protocol=load_protocol("v1"), device="cpu",
                    progress=False, rerank=False)
    bundle = runner.bundle(runner.zoo["tiny-cs"])
    runner.clean_features(bundle)
    ctx = runner.attack_context(bundle, runner.make_attack("oblivious", EPS, bundle), "query")
    size = tuple(bundle.model.input_size)
    expected = extract_features(bundle.model.model, bundle.split.gallery, size, progress=False)
    assert ctx.bare is not None and torch.allclose(ctx.bare.gallery_feats, expected, atol=1e-6)
    assert not torch.allclose(ctx.gallery_feats, expected, atol=1e-3)  # the defended pipeline's differ
    assert runner.attack_context(bundle, runner.make_attack("m-ifgsm", EPS, bundle), "query").bare is None


def test_restarts_leave_the_global_rng_as_a_single_run_does(setting, monkeypatch):
    from defenses.transforms import RandomResizePad

    runs = []
    run = IterativeMetricAttack._run
    monkeypatch.setattr(IterativeMetricAttack, "_run", lambda self, m, x0, base: runs.append(len(x0)) or run(self, m, x0, base))

    class RRP(Defense):
        stochastic = True

        def input_transform(self):
            return RandomResizePad()

    model, split, queries, _ = setting
    defended = DefendedModel(model.model, RRP()).eval()
    index = torch.arange(len(queries))
    ctx = white_box_context(defended, split, index)
    after = []
    for restarts in (1, 3):
        torch.manual_seed(5)
        build_attack("sma", eps=1 / 255, step=STEP, iterations=1, eot_samples=2, best_iterate=True,
                     restarts=restarts)(defended, queries[index], fresh(ctx))
        after.append(torch.rand(4))
    assert len(runs) > 2, "the test needs the second attack to restart"
    assert torch.equal(*after)
