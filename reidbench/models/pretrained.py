"""ImageNet initialisation from a local file pinned by sha256.

Every paper this benchmark reproduces starts its backbone from ImageNet weights. Online, a
zoo entry says ``pretrained: true`` and timm fetches them (one line when it cannot). Offline,
an entry names a file and its sha256::

    model: {pretrained: {file: imagenet/mobilenet_v2-imagenet1k.safetensors,
                         sha256: 56ec2c53..., layout: torchvision}}

A relative ``file`` is looked up the way datasets are: ``$REIDBENCH_WEIGHTS``, ``./weights``,
``../shared/weights``. The hash is checked before a byte of the file is parsed, so a tampered
or truncated file is refused, never loaded. ``layout`` says whose key names the file uses:
``timm`` (the backbone's own ``state_dict`` keys) or ``torchvision`` (renamed here; only the
architectures in :data:`LAYOUTS` are known). Every backbone tensor must be filled by the file
with the right shape: a file for another architecture is one line, not a silent partial load.

The file initialises training only: an entry's trained weights replace it, so evaluating a
trained entry never needs the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..cache import sha256_file
from ..errors import ReIDBenchError, first_line

_SPEC_FIELDS = {"file", "sha256", "layout"}


def weights_roots() -> list[Path]:
    """Folders searched for a relative pretrained file, in order: $REIDBENCH_WEIGHTS,
    ./weights, ../shared/weights."""
    roots = []
    if os.environ.get("REIDBENCH_WEIGHTS"):
        roots.append(Path(os.environ["REIDBENCH_WEIGHTS"]).expanduser())
    return roots + [Path.cwd() / "weights", Path.cwd().parent / "shared" / "weights"]


def _torchvision_mobilenet_v2(key: str) -> str:
    """torchvision ``mobilenet_v2().features.*`` -> timm ``mobilenetv2_100``. Both number the
    17 inverted-residual blocks in order; timm groups them in stages of 1, 2, 3, 4, 3, 3, 1."""
    stages = (1, 2, 3, 4, 3, 3, 1)
    match = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if match is None:
        raise KeyError(key)
    index, rest = int(match.group(1)), match.group(2)
    if index == 0:
        return {"0": "conv_stem", "1": "bn1"}[rest.split(".")[0]] + rest[1:]
    if index == 18:
        return {"0": "conv_head", "1": "bn2"}[rest.split(".")[0]] + rest[1:]
    block = index - 1
    stage = 0
    while block >= stages[stage]:
        block -= stages[stage]
        stage += 1
    prefix = f"blocks.{stage}.{block}."
    if index == 1:  # expansion 1: depthwise, then the linear pointwise projection
        names = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
    else:
        names = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                 "conv.2": "conv_pwl", "conv.3": "bn3"}
    for old, new in names.items():
        if rest.startswith(old + "."):
            return prefix + new + rest[len(old):]
    raise KeyError(key)


#: (layout, timm backbone) -> key renaming into the timm backbone's names
LAYOUTS: dict[tuple[str, str], Callable[[str], str]] = {
    ("torchvision", "mobilenetv2_100"): _torchvision_mobilenet_v2,
}


def check_spec(spec: dict, where: str) -> None:
    if not isinstance(spec, dict) or not {"file", "sha256"} <= set(spec) or set(spec) - _SPEC_FIELDS:
        raise ReIDBenchError(f"{where}: pretrained must be true/false, a path, or a mapping with file and sha256 "
                             f"(and optionally layout: timm or torchvision); got {spec!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", str(spec["sha256"])):
        raise ReIDBenchError(f"{where}: pretrained sha256 must be 64 lowercase hex digits, got {spec['sha256']!r}")
    if spec.get("layout", "timm") not in ("timm", "torchvision"):
        raise ReIDBenchError(f"{where}: unknown pretrained layout '{spec['layout']}' (choose timm or torchvision)")


def resolve_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_absolute():
        if path.is_file():
            return path
        raise ReIDBenchError(f"pretrained weights file not found: {path}")
    roots = weights_roots()
    for root in roots:
        if (root / path).is_file():
            return root / path
    raise ReIDBenchError(f"pretrained weights file '{name}' not found in {', '.join(str(r) for r in roots)} "
                         "(set REIDBENCH_WEIGHTS, or use pretrained: true online)")


def load_pretrained(backbone: nn.Module, backbone_name: str, spec: dict) -> Path:
    """Fill ``backbone`` (a timm model) from the pinned file ``spec``; returns the file's path."""
    check_spec(spec, f"backbone '{backbone_name}'")
    path = resolve_file(spec["file"])
    actual = sha256_file(path)
    if actual != spec["sha256"]:
        raise ReIDBenchError(f"pretrained weights {path} have sha256 {actual[:16]}..., expected {spec['sha256'][:16]}... "
                             "(a changed or truncated file); refusing to load it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a user's file is one line
        raise ReIDBenchError(f"cannot read pretrained weights {path}: {first_line(exc)}") from None
    layout = spec.get("layout", "timm")
    if layout != "timm":
        rename = LAYOUTS.get((layout, backbone_name))
        if rename is None:
            known = ", ".join(f"{lay} for {net}" for lay, net in LAYOUTS)
            raise ReIDBenchError(f"no '{layout}' key layout is known for backbone '{backbone_name}' (known: {known})")
        try:
            state = {rename(k): v for k, v in state.items()}
        except (KeyError, IndexError) as exc:
            raise ReIDBenchError(f"pretrained weights {path} do not fit backbone '{backbone_name}' "
                                 f"in the {layout} layout: unexpected key {exc}") from None
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise ReIDBenchError(f"pretrained weights {path} do not fit backbone '{backbone_name}': {', '.join(problems)}")
    backbone.load_state_dict(state)
    return path

