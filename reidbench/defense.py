"""The defense contract.

A defense is two optional things: a training recipe change (how a batch is prepared and
which loss is minimised, always inside the one shared loop of ``reidbench.train``) and an
inference-time input transform. Input transforms are ``nn.Module``s on images in [0, 1],
differentiable where the maths allows, so a white-box attacker goes through them; a
randomized one sets ``stochastic = True`` (the protocol then attacks it with EOT) and a
non-differentiable one provides a BPDA surrogate (Athalye et al., ICML 2018).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .errors import ReIDBenchError
from .registry import DEFENSES
from .train.losses import reid_loss


@dataclass(frozen=True, eq=False)
class TrainBatch:
    """One step of the shared training loop, as a defense's training hooks receive it.

    ``images``: (B, 3, H, W) images in [0, 1], or (B, T, 3, H, W) tracklets for a video model,
    already augmented. ``pids``: the classifier's labels, the dataset's person ids mapped to
    0..C-1. ``camids``: the dataset's camera of each image. ``modality``: 0 visible, 1
    infrared, None when the dataset has no modality labels. All on the images' device.
    """

    images: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    modality: Optional[torch.Tensor] = None


class Defense:
    """Base class of every registered defense; the undefended baseline uses it as is."""

    registry_name = "defense"
    #: the inference transform draws randomness: white-box attacks need EOT
    stochastic = False
    #: the inference transform has no useful gradient: white-box attacks need BPDA
    differentiable = True
    #: datasets kinds the defense can train on ("image", "video", "cross-modality")
    data_kinds: tuple[str, ...] = ("image",)
    #: parameters whose value may name another zoo entry (e.g. APD's ``feature_net``): the zoo
    #: pins that entry's recipe key into this one's, so retraining it retrains this
    zoo_references: tuple[str, ...] = ()
    #: bump when a default that shapes training changes (tests/training_defaults.json keeps
    #: the last ones): from 2 on it is part of a zoo entry's recipe key, so weights trained
    #: under the old default are retrained, not reused
    training_version: int = 1
    #: parameters that shape only the inference transform (JAD's scaling): they are part of
    #: ``describe()``, hence of every cell's key, but not of the training record
    #: (tests/training_defaults.json), since changing them retrains nothing
    inference_params: tuple[str, ...] = ()

    def __init__(self, **params):
        self.params = params

    # --- inference -----------------------------------------------------------------
    def input_transform(self) -> Optional[nn.Module]:
        """The transform applied to every query and gallery image before the model."""
        return None

    def bpda_surrogate(self) -> Optional[nn.Module]:
        """A differentiable stand-in used in the backward pass when ``differentiable`` is False."""
        return None

    # --- training (called by reidbench.zoo.train_entry and reidbench.train.train_model) --
    def prepare_train(self, split, device: str = "cpu", zoo: Optional[dict] = None):
        """The training subset the shared loop trains on, built once per training run; a
        defense that adds training data (DDID's generated images) returns an extended subset
        (see ``reidbench.data.concat_subsets``) and caches what is costly to rebuild.
        ``zoo`` is the zoo of the entry being trained (None outside one): where a defense
        finds the entries its ``zoo_references`` parameters name (APD's frozen feature network)."""
        return split.train

    def training_batch(self, model: nn.Module, batch: TrainBatch, generator: torch.Generator) -> torch.Tensor:
        """The images the loss is computed on: ``batch.images`` replaced in part or in whole
        (adversarial examples, proactive transforms), one per image, so the batch's labels
        still hold. Random draws come from ``generator``, which the loop re-seeds each epoch,
        so that a resumed run draws what an uninterrupted one would."""
        return batch.images

    def training_loss(self, model: nn.Module, batch: TrainBatch, recipe) -> tuple[torch.Tensor, dict]:
        """The loss minimised on the batch whose images :meth:`training_batch` returned, and
        the named terms to log; the default is the standard ReID loss."""
        return reid_loss(model, batch.images, batch.pids, recipe)

    def training_state(self) -> dict:
        """What the defense itself learns during training (e.g. a generator and its optimiser),
        saved with each epoch's checkpoint so that a resumed run continues it."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`training_state` when a run resumes."""

    def check_dataset(self, split) -> None:
        """Raise a ReIDBenchError when the defense cannot train on this dataset."""
        kind = split.info.get("kind", "image")
        if kind not in self.data_kinds:
            raise ReIDBenchError(
                f"defense '{self.registry_name}' trains on {', '.join(self.data_kinds)} data, "
                f"but dataset '{split.name}' is {kind} data"
            )

    @property
    def changes_training(self) -> bool:
        """False when the defense trains exactly as the baseline (an inference transform only)."""
        cls = type(self)
        return (cls.training_batch is not Defense.training_batch or cls.training_loss is not Defense.training_loss
                or cls.prepare_train is not Defense.prepare_train)

    def describe(self) -> dict:
        return {"name": self.registry_name, **self.params}


class BPDA(nn.Module):
    """A transform whose backward pass is a differentiable surrogate's (Athalye et al., ICML
    2018, §4.1). Forward: ``transform(x)``, exactly; backward: the gradient of ``surrogate(x)``
    (identity when None: the straight-through estimator, the paper's choice for transforms with
    ``t(x) ≈ x`` such as quantisation or JPEG). Written ``t(x) + (s(x) - s(x).detach())`` so
    the forward value is bit-exact ``t(x)``; the transform runs without autograd."""

    def __init__(self, transform: nn.Module, surrogate: Optional[nn.Module] = None):
        super().__init__()
        self.transform = transform
        self.surrogate = surrogate if surrogate is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.transform(x)
        s = self.surrogate(x)
        return y + (s - s.detach())


class DefendedModel(nn.Module):
    """``model ∘ transform``: what attacks and evaluation see. Images in [0, 1] in, embeddings out."""

    def __init__(self, model: nn.Module, defense: Defense, transform: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.defense = defense
        self.transform = transform if transform is not None else defense.input_transform()
        self.input_size = getattr(model, "input_size", None)

    def with_bpda(self) -> "DefendedModel":
        """The same model whose transform runs forward as is but back-propagates through the
        defense's BPDA surrogate (identity when it names none): Athalye et al., ICML 2018."""
        if self.transform is None:
            return self
        # In this model's mode: a new module starts in train mode, and an attack restores the
        # mode it found on the wrapper onto the shared network (Attack.__call__).
        return DefendedModel(self.model, self.defense, BPDA(self.transform, self.defense.bpda_surrogate())).train(self.training)

    @property
    def stochastic(self) -> bool:
        return self.transform is not None and self.defense.stochastic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        return self.model(x)


def build_defense(spec: dict | str) -> Defense:
    """Instantiate a registered defense from ``{name: ..., **params}`` or a bare name."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise ReIDBenchError("a defense needs a 'name'")
    cls = DEFENSES.get(name)
    try:
        return cls(**spec)
    except TypeError as exc:
        raise ReIDBenchError(f"defense '{name}': bad parameters {sorted(spec)}: {exc}") from None
