"""Every key of a protocol file is read: what the engine cannot honour is refused in one line,
the rest reaches the run (no key only changes the fingerprint)."""

import copy
import subprocess
import sys

import pytest

from reidbench.errors import ReIDBenchError
from reidbench.protocol import Protocol, known_versions, load_protocol
from reidbench.registry import ATTACKS
from reidbench.grid import check_attack_names
from reidbench.runner import Runner


def with_changes(**changes) -> dict:
    raw = copy.deepcopy(load_protocol().raw)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = raw
        for key in path:
            node = node[key]
        node[last] = value
    return raw


@pytest.mark.parametrize("key, value", [("perturbation__norm", "l2"), ("features__distance", "cosine"),
                                        ("perturbed", "both")])
def test_a_setting_the_engine_does_not_implement_is_refused_in_one_line(key, value):
    with pytest.raises(ReIDBenchError, match=f"implements") as caught:
        Protocol("v2", with_changes(**{key: value}))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("version", known_versions())
def test_every_shipped_protocol_names_registered_attacks_on_its_own_side(version):
    protocol = load_protocol(version)
    check_attack_names(protocol.attacks(), protocol)
    assert protocol.variants and not set(protocol.variants) & set(protocol.attacks())


def test_a_grid_attack_on_the_wrong_side_or_an_unknown_variant_fails_before_any_work():
    raw = with_changes(attacks={"white-box": ["m-ifgsm", "m-ifgsm-gallery"]})
    with pytest.raises(ReIDBenchError, match="'m-ifgsm-gallery' perturbs the gallery"):
        check_attack_names(["m-ifgsm"], Protocol("v2", raw))
    with pytest.raises(ReIDBenchError, match="unknown"):
        check_attack_names(["m-ifgsm"], Protocol("v2", with_changes(variants=["eot", "m-ifsgm"])))


def test_the_transfer_attack_runs_the_protocols_inner_attack_and_records_it():
    runner = Runner({}, protocol=Protocol("v2", with_changes(transfer__attack="m-ifgsm")), device="cpu",
                    progress=False)
    attack = runner.make_attack("transfer", 5 / 255)
    assert attack.inner.registry_name == "m-ifgsm" and attack.describe()["inner"]["name"] == "m-ifgsm"
    # The shipped protocol's inner attack is the transfer attack's own default: its cells keep their keys.
    p = load_protocol()
    current = Runner({}, device="cpu", progress=False).make_attack("transfer", p.eps)
    default = ATTACKS.get("transfer")(p.eps, p.step, p.iterations, seed=p.seed).strengthen(p.restarts, p.best_iterate)
    assert current.describe() == default.describe()


def test_list_attacks_shows_each_attacks_place_in_the_protocol():
    out = subprocess.run([sys.executable, "-m", "reidbench.cli", "list", "attacks"], capture_output=True, text=True,
                         check=True).stdout
    roles = dict(line.split("\t")[:2] for line in out.splitlines())
    assert roles["m-ifgsm"] == "grid (white-box)" and roles["rank-query"] == "grid (query-based)"
    assert roles["m-ifgsm-gallery"] == "variant"
