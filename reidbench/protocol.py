"""The evaluation protocol: a versioned, fixed YAML file shipped with the package.

Attack budgets and metric settings are read from here and nowhere else, so a number in a
table always means the same thing; results carry the protocol version and are never mixed
across versions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources

import yaml

from .errors import ReIDBenchError

CURRENT_VERSION = "v2"
# What a version that predates a setting meant by it (v1 broke ties by gallery index and ran
# every attack once, keeping its last iterate).
_TIES = ("index", "pessimistic")


#: what the engine implements of the settings a protocol file states; a file asking for
#: anything else is refused rather than silently run as these
_SUPPORTED = {"perturbation.norm": ("linf",), "features.distance": ("euclidean",), "perturbed": ("query", "gallery")}


@dataclass(frozen=True)
class Protocol:
    version: str
    raw: dict

    def __post_init__(self):
        for key, supported in _SUPPORTED.items():
            value = self._setting(key)
            if value not in supported:
                raise ReIDBenchError(f"protocol {self.version}: {key} is {value!r}, but reidbench implements "
                                     f"{' or '.join(map(repr, supported))}")

    def _setting(self, key: str) -> str:
        """A setting of :data:`_SUPPORTED` (``section.name``), its first supported value when unset."""
        section, _, name = key.rpartition(".")
        return (self.raw.get(section, {}) if section else self.raw).get(name, _SUPPORTED[key][0])

    @property
    def distance(self) -> str:
        """How features are compared (recorded with every cell's conventions)."""
        return self._setting("features.distance")

    @property
    def perturbed(self) -> str:
        """Which side every grid attack perturbs: the query (the gallery stays clean)."""
        return self._setting("perturbed")

    @property
    def variants(self) -> list[str]:
        """Registered attacks the protocol names but keeps out of its grid."""
        return list(self.raw.get("variants", []))

    @property
    def transfer_attack(self) -> str:
        """The white-box attack the ``transfer`` attack runs on the surrogate."""
        return self.raw.get("transfer", {}).get("attack", "m-mifgsm")

    def attack_params(self, name: str) -> dict:
        """Parameters the protocol fixes for attack ``name`` beyond the budget."""
        return {"inner": self.transfer_attack} if name == "transfer" else {}

    @property
    def eps(self) -> float:
        return self.raw["perturbation"]["eps_255"] / 255.0

    @property
    def eps_secondary(self) -> float:
        return self.raw["perturbation"]["eps_secondary_255"] / 255.0

    @property
    def step(self) -> float:
        return self.raw["perturbation"]["step_255"] / 255.0

    @property
    def iterations(self) -> int:
        return int(self.raw["perturbation"]["iterations"])

    @property
    def seed(self) -> int:
        return int(self.raw.get("seed", 0))

    @property
    def normalize(self) -> bool:
        return bool(self.raw["features"]["normalize"])

    @property
    def max_rank(self) -> int:
        return int(self.raw["metrics"]["max_rank"])

    @property
    def ap(self) -> str:
        return self.raw["metrics"]["ap"]

    @property
    def rerank(self) -> dict:
        return dict(self.raw["metrics"]["rerank"])

    @property
    def ties(self) -> str:
        """How a positive and a negative at the same distance are ordered: ``index`` (v1:
        by gallery index) or ``pessimistic`` (v2: the positive ranks last)."""
        ties = self.raw["metrics"].get("ties", "index")
        if ties not in _TIES:
            raise ReIDBenchError(f"protocol {self.version}: metrics.ties must be one of {', '.join(_TIES)}, got {ties!r}")
        return ties

    @property
    def interval(self) -> dict:
        """Settings of the identity bootstrap behind every interval. v1 defines none; records
        of v1 get intervals (from their per-query files) with v2's settings."""
        spec = {"method": "identity-bootstrap", "resamples": 1000, "level": 0.95,
                **dict(self.raw["metrics"].get("interval") or {})}
        if spec["method"] != "identity-bootstrap":
            raise ReIDBenchError(f"protocol {self.version}: unknown interval method {spec['method']!r}")
        return {"resamples": int(spec["resamples"]), "level": float(spec["level"])}

    @property
    def rerank_attacked_adaptive(self) -> bool:
        """Whether attacks are run through re-ranking (no version does: every re-ranked number
        under attack is non-adaptive, and v2 labels it so)."""
        return self.raw["metrics"].get("rerank_attacked", "non-adaptive") == "adaptive"

    @property
    def restarts(self) -> int:
        """Starts per iterative attack (v1: one)."""
        return int(self.raw.get("attack", {}).get("restarts", 1))

    @property
    def best_iterate(self) -> bool:
        """Whether an iterative attack keeps each query's best iterate (v1: the last one)."""
        return bool(self.raw.get("attack", {}).get("best_iterate", False))

    @property
    def consistent_keys(self) -> list[str]:
        """Record fields on which every cell of a worst case must agree."""
        return list(self.raw.get("worst_case", {}).get("consistent", ["weights_sha256", "split_hash", "protocol_fingerprint"]))

    @property
    def eot_samples(self) -> int:
        return int(self.raw.get("adaptive", {}).get("eot_samples", 1))

    @property
    def bpda(self) -> bool:
        return bool(self.raw.get("adaptive", {}).get("bpda", False))

    @property
    def zero_gradient_flag(self) -> float:
        return float(self.raw.get("sanity", {}).get("zero_gradient_share", 0.5))

    @property
    def surrogates(self) -> dict[str, str]:
        """The fixed transfer surrogate (zoo id) of each dataset."""
        return dict(self.raw.get("transfer", {}).get("surrogates", {}))

    def has_surrogate(self, dataset: str) -> bool:
        return dataset in self.surrogates

    def surrogate(self, dataset: str) -> str:
        surrogates = self.surrogates
        if dataset not in surrogates:
            raise ReIDBenchError(
                f"protocol {self.version} fixes no transfer surrogate for dataset '{dataset}' "
                f"(it has: {', '.join(sorted(surrogates)) or 'none'})")
        return surrogates[dataset]

    @property
    def secondary_attacks(self) -> list[str]:
        """The attacks ``run --all`` also runs at :attr:`eps_secondary`, so that every model
        has robustness at two budgets (the model page plots it against ε). v1 and v2 fix the
        secondary budget but not which attacks spend it; the suite reads it as the reference
        attack of Bai et al. (2019), M-I-FGSM, unless the file names them
        (``perturbation.secondary_attacks``)."""
        return list(self.raw["perturbation"].get("secondary_attacks", ["m-ifgsm"]))

    def attacks(self, threat_model: str | None = None) -> list[str]:
        groups = self.raw.get("attacks", {})
        if threat_model is not None:
            return list(groups.get(threat_model, []))
        return [name for names in groups.values() for name in names]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]


def known_versions() -> list[str]:
    """Protocol versions this package ships, oldest first."""
    names = [p.name[:-5] for p in resources.files("reidbench.protocols").iterdir()
             if p.name.startswith("v") and p.name.endswith(".yaml")]
    return sorted(names, key=lambda v: (len(v), v))


def load_protocol(version: str = CURRENT_VERSION) -> Protocol:
    if not isinstance(version, str) or not version.replace("v", "", 1).isdigit() or not version.startswith("v"):
        raise ReIDBenchError(f"unknown protocol version {version!r} (known: {', '.join(known_versions())}; "
                             f"current: {CURRENT_VERSION})")
    try:
        text = resources.files("reidbench.protocols").joinpath(f"{version}.yaml").read_text()
    except (FileNotFoundError, OSError):
        raise ReIDBenchError(f"unknown protocol version '{version}' (known: {', '.join(known_versions())}; "
                             f"current: {CURRENT_VERSION})") from None
    raw = yaml.safe_load(text)
    if raw.get("version") != version:
        raise ReIDBenchError(f"protocol file {version}.yaml declares version {raw.get('version')!r}")
    return Protocol(version, raw)
