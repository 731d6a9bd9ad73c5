"""The shared training loop.

Every defense trains through :func:`train_model`: the loop owns data sampling (P×K),
augmentation, optimiser, warm-up + schedule, mixed precision on a GPU, checkpoints and
resumption; a defense only changes how a batch is prepared and which loss is minimised
(see :class:`reidbench.defense.Defense`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..cache import atomic_write, fingerprint, load_verified, save_safetensors, save_torch
from ..data.sampler import PKSampler
from ..data.split import ReIDSubset, TrackletSubset
from ..defense import Defense, TrainBatch
from ..errors import ReIDBenchError
from ..hardware import cpu_capability, cpu_model
from ..progress import console, log, progress_bar
from .augment import random_erasing, random_flip, random_pad_crop


#: beside ``model.safetensors``: how long training took (``benchmarks/cost_table.py`` reads it).
#: Kept out of the weights file, whose bytes (hence sha256, hence every cell's input key) must
#: not depend on the machine's speed.
TRAINING_RECORD = "training.json"


@dataclass
class Recipe:
    """Everything that decides a training run. Defaults are a small CPU recipe; the papers'
    GPU recipe (ResNet-50, 256×128, 120 epochs, step at 40/70) is a zoo entry override."""

    epochs: int = 30
    p: int = 16
    k: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    optimizer: str = "adam"
    warmup_epochs: int = 3
    schedule: str = "cosine"
    milestones: tuple = (40, 70)
    gamma: float = 0.1
    label_smoothing: float = 0.1
    triplet_margin: Optional[float] = 0.3
    triplet_weight: float = 1.0
    ce_weight: float = 1.0
    flip: bool = True
    pad: int = 4
    random_erasing: float = 0.5
    iters_per_epoch: Optional[int] = None
    amp: bool = True
    seed: int = 0
    #: visible-infrared data: half of each identity's K from each modality (see PKSampler)
    modality_balance: bool = True

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "Recipe":
        data = dict(data or {})
        if "batch" in data:  # zoo style: batch: {p: 16, k: 4}
            batch = data.pop("batch") or {}
            data.update({k: v for k, v in batch.items() if k in ("p", "k")})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ReIDBenchError(f"unknown recipe field(s) {unknown} (known: {sorted(names)})")
        if "milestones" in data:
            data["milestones"] = tuple(data["milestones"])
        recipe = cls(**data)
        if recipe.schedule not in ("cosine", "step"):
            raise ReIDBenchError(f"unknown schedule '{recipe.schedule}' (choose cosine or step)")
        if recipe.optimizer not in ("adam", "sgd"):
            raise ReIDBenchError(f"unknown optimizer '{recipe.optimizer}' (choose adam or sgd)")
        if recipe.epochs < 1 or recipe.p < 2 or recipe.k < 2:
            raise ReIDBenchError("a recipe needs epochs >= 1 and a batch with p >= 2 identities of k >= 2 images")
        return recipe

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    def lr_factor(self, epoch: float) -> float:
        """Linear warm-up from 1% (Luo et al., 2019), then cosine to 0 or steps at ``milestones``."""
        if epoch < self.warmup_epochs:
            return 0.01 + 0.99 * epoch / self.warmup_epochs
        if self.schedule == "step":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        span = max(self.epochs - self.warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))


@dataclass
class TrainResult:
    weights: Path
    epochs_run: int
    history: list = field(default_factory=list)
    seconds: float = 0.0


def _on_device(train, device: torch.device):
    """On a GPU, the decoded training images move there once (uint8; Market at 256x128 is
    0.85 GB), so batches are gathered and augmented on the device instead of being built on
    the host and copied every step. Left on the host when they would take over a quarter of
    the free device memory."""
    if device.type != "cuda" or getattr(train, "images", None) is None or train.images.device == device:
        return train
    free, _ = torch.cuda.mem_get_info(device)
    if train.images.numel() * train.images.element_size() > free // 4:
        return train
    return dataclasses.replace(train, images=train.images.to(device))


def training_record(workdir: Path) -> Optional[dict]:
    """What :func:`train_model` recorded about the run that wrote ``workdir``'s weights
    (``wall_time_s``, epochs); None for weights trained before it kept a record, or a damaged one."""
    return load_verified(Path(workdir) / TRAINING_RECORD, lambda p: json.loads(p.read_text()), "training record")


def relabel(pids: torch.Tensor) -> torch.Tensor:
    """Map arbitrary person ids to contiguous class labels 0..C-1 (sorted order)."""
    _, labels = torch.unique(pids, return_inverse=True)
    return labels


def train_model(
    model: torch.nn.Module,
    train: ReIDSubset | TrackletSubset,
    recipe: Recipe,
    workdir: Path,
    defense=None,
    device: str = "cpu",
    progress: bool = True,
    run_key: Optional[dict] = None,
) -> TrainResult:
    """Train ``model`` on ``train`` (images, or tracklets for a video model) and write
    ``workdir/model.safetensors``.

    After every epoch ``last.safetensors`` + ``last_state.pt`` are written atomically; a
    rerun with the same recipe and ``run_key`` resumes after the last finished epoch.
    """
    defense = defense or Defense()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = fingerprint({"recipe": recipe.to_dict(), "run": run_key or {}})
    device = torch.device(device)
    model.to(device)
    use_amp = recipe.amp and device.type == "cuda"

    size = tuple(getattr(model, "input_size", train.load_uint8(torch.arange(1)).shape[-2:]))
    train = train.materialize(size) if train.stored_size != size else train
    train = _on_device(train, device)
    labels = relabel(train.pids)
    sampler = PKSampler(train.pids, p=recipe.p, k=recipe.k, seed=recipe.seed,
                        modality=train.modality if recipe.modality_balance else None)
    iters = recipe.iters_per_epoch or len(sampler)

    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay, nesterov=True)

    start_epoch, history, earlier_seconds = 0, [], 0.0
    state_path, last_path = workdir / "last_state.pt", workdir / "last.safetensors"
    # A damaged checkpoint (a run killed mid-copy, a full disk) is reported and training starts over.
    state = load_verified(state_path, lambda p: torch.load(p, weights_only=True), "training state")
    last = load_verified(last_path, lambda p: load_file(str(p), device=str(device)), "checkpoint") if state else None
    if state is not None and last is not None:
        if state.get("key") == key:
            model.load_state_dict(last)
            optimizer.load_state_dict(state["optimizer"])
            defense.load_training_state(state.get("defense", {}))
            start_epoch, history = int(state["epoch"]) + 1, json.loads(state["history"])
            earlier_seconds = float(state.get("wall_time_s", 0.0))  # absent in states written before it was kept

    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.time()
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(f"train {workdir.name}", total=recipe.epochs * iters, completed=start_epoch * iters,
                            lines=False)
        for epoch in range(start_epoch, recipe.epochs):
            # Re-seed per epoch so a resumed run draws exactly what an uninterrupted one would.
            generator.manual_seed(recipe.seed * 100003 + epoch)
            sampler.set_epoch(epoch)
            batches = iter(sampler)
            sums: dict = {}
            model.train()
            for it in range(iters):
                try:
                    index = next(batches)
                except StopIteration:
                    batches = iter(sampler)
                    index = next(batches)
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr * recipe.lr_factor(epoch + it / iters)
                images = train.load(index)  # (B, 3, H, W) images or (B, T, 3, H, W) tracklets
                if recipe.flip:
                    images = random_flip(images, generator)
                images = random_pad_crop(images, recipe.pad, generator)
                images = random_erasing(images, recipe.random_erasing, generator)
                batch = TrainBatch(images.to(device, non_blocking=True), labels[index].to(device),
                                   train.camids[index].to(device),
                                   None if train.modality is None else train.modality[index].to(device))
                batch = dataclasses.replace(batch, images=defense.training_batch(model, batch, generator))
                model.train()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, logs = defense.training_loss(model, batch, recipe)
                if not torch.isfinite(loss):
                    raise ReIDBenchError(f"training diverged at epoch {epoch} (loss {float(loss)}); lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                logs["loss"] = float(loss.detach())
                for name, value in logs.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.update(task, advance=1, description=f"train {workdir.name} ep {epoch + 1}/{recipe.epochs} loss {logs['loss']:.3f}")
            history.append({"epoch": epoch, **{k: v / iters for k, v in sums.items()}})
            if progress and not console.is_terminal:  # a log file gets one line per epoch instead of a live bar
                log(f"{workdir.name}: epoch {epoch + 1}/{recipe.epochs} " + " ".join(
                    f"{k} {v:.4f}" for k, v in history[-1].items() if k != "epoch"))
            save_safetensors(model.state_dict(), last_path, {"epoch": str(epoch)})
            save_torch(
                {"key": key, "epoch": epoch, "optimizer": optimizer.state_dict(), "history": json.dumps(history),
                 "defense": defense.training_state(), "wall_time_s": earlier_seconds + time.time() - started}, state_path
            )
    final = workdir / "model.safetensors"
    metadata = {"recipe": json.dumps(recipe.to_dict(), sort_keys=True), "history": json.dumps(history), "key": key}
    metadata.update({k: json.dumps(v, sort_keys=True, default=str) for k, v in (run_key or {}).items()})
    save_safetensors(model.state_dict(), final, metadata)
    seconds = time.time() - started
    # Every epoch's time, those of interrupted runs it resumed included.
    atomic_write(workdir / TRAINING_RECORD, (json.dumps(
        {"wall_time_s": round(earlier_seconds + seconds, 3), "epochs": recipe.epochs,
         "epochs_this_run": recipe.epochs - start_epoch, "device": str(device), "threads": torch.get_num_threads(),
         "cpu_capability": cpu_capability(), "cpu_model": cpu_model()},
        sort_keys=True) + "\n").encode())
    return TrainResult(final, recipe.epochs - start_epoch, history, seconds)
