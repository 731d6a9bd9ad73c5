"""The papers' scale on one GPU, inside a wall-clock budget.

Trains at 256x128 on ``market1501-trainsplit`` -- an ImageNet-initialised MobileNetV2
baseline, then JAD, GOAT-FNA and DDID fine-tuned from it (as the CPU Market entries are) --
runs the protocol grid on them through the ordinary runner, and writes result records plus
one table with the hardware. Every training length is planned from throughput measured at the
start of the run on the machine itself, so the run fits ``--budget-s``; the grid's cells run
in priority order and stop before the deadline, so an early stop leaves complete cells.

    python benchmarks/gpu/paper_scale.py run --out OUT --budget-s 500   # needs the data + weights
    python benchmarks/gpu/paper_scale.py table --out OUT                 # the table from OUT's records

``--toy`` runs the same pipeline on the tiny synthetic preset at 64x32 on the CPU (the slow
test uses it). ``paper_scale.sh`` beside this is the GPU machine's entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from reidbench.record import CellRecord, Metrics  # noqa: E402

IMAGENET_FILE = "imagenet/mobilenet_v2-imagenet1k.safetensors"
IMAGENET_SHA256 = "56ec2c53fabd9fd2d328fe9ead7659ccd875af992f689ca261cf2123fb5ff4f8"
BACKBONE = "mobilenetv2_100"

#: what each trained model is, in training order; ``share`` is its part of the training
#: budget, ``paper_epochs`` the most it is given (the papers' length for a from-scratch run,
#: fewer for a fine-tune)
MODELS = [
    {"name": "none", "defense": {"name": "none"}, "share": 0.20, "paper_epochs": 120, "lr": 3.5e-4},
    {"name": "goat-fna", "defense": {"name": "goat-fna"}, "share": 0.30, "paper_epochs": 40, "lr": 1.0e-4},
    {"name": "jad", "defense": {"name": "jad"}, "share": 0.15, "paper_epochs": 40, "lr": 1.0e-4},
    {"name": "ddid", "defense": {"name": "ddid"}, "share": 0.35, "paper_epochs": 40, "lr": 1.0e-4},
]
#: attacks run right after each model is trained (the defense table's columns), then the rest
#: of the grid, model by model, while time is left
FIRST = ["m-mifgsm", "sma", "fna", "lta", "oblivious"]
TOY_EPOCHS = 2
TRAINING_SHARE = 0.55  # of what is left after the data and the throughput probe


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.time(), budget

    @property
    def elapsed(self) -> float:
        return time.time() - self.start

    @property
    def left(self) -> float:
        return self.budget - self.elapsed


def hardware(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def probe_step_seconds(defense_spec: dict, size, p: int, k: int, num_classes: int, device: str, steps: int = 4) -> float:
    """Seconds per training step of ``defense_spec`` on a random P×K batch (after one warm-up
    step), through the defense's own batch and loss hooks, as the shared loop runs them."""
    from reidbench.defense import TrainBatch, build_defense
    from reidbench.models import build_model
    from reidbench.train.loop import Recipe

    model = build_model({"backbone": BACKBONE, "input_size": list(size), "last_stride": 1}, num_classes=num_classes).to(device)
    defense = build_defense(defense_spec)
    recipe = Recipe.from_dict({"batch": {"p": p, "k": k}})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(p * k, 3, *size, device=device)
    pids = torch.arange(p, device=device).repeat_interleave(k)
    generator = torch.Generator().manual_seed(0)
    clean = TrainBatch(images, pids, torch.zeros_like(pids))
    use_amp = device.startswith("cuda")

    def step():
        batch = dataclasses.replace(clean, images=defense.training_batch(model, clean, generator))
        model.train()
        with torch.autocast("cuda" if use_amp else "cpu", dtype=torch.bfloat16, enabled=use_amp):
            loss, _ = defense.training_loss(model, batch, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    _sync(device)
    started = time.time()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.time() - started) / steps


def probe_ddpm_seconds(ddid_spec: dict, num_ids: int, num_cameras: int, device: str, steps: int = 12) -> float:
    """Seconds per DDPM step through DDID's own ``train_ddpm`` (EMA and loss logging included),
    on random images at the DDPM's size."""
    from defenses.ddid.diffusion import train_ddpm
    from reidbench.defense import build_defense

    ddid = build_defense(ddid_spec)
    ddpm = ddid.build_ddpm(num_ids, num_cameras)
    size, batch = tuple(ddid.params["ddpm_size"]), int(ddid.params["ddpm_batch"])
    images = torch.randint(0, 256, (max(batch, 64), 3, *size), dtype=torch.uint8)
    ids = torch.randint(0, num_ids, (len(images),))
    cams = torch.randint(0, num_cameras, (len(images),)) if num_cameras else None

    def run(n: int) -> float:
        _sync(device)
        started = time.time()
        train_ddpm(ddpm, images, ids, cams, n, batch, 1e-4, torch.Generator().manual_seed(0), 0.995, device, False)
        _sync(device)
        return time.time() - started

    run(2)
    return run(steps) / steps


def ddid_defense(toy: bool, size) -> dict:
    """DDID at the GPU's scale: a DDPM at half the input resolution (the CPU preset's is 32x16),
    tops identities up to the 0.75 quantile of image counts as the CPU Market entry does."""
    if toy:
        return {"name": "ddid", "ddpm_size": [16, 8], "ddpm_channels": 8, "ddpm_levels": [1, 2], "ddpm_steps": 10,
                "ddpm_batch": 8, "sample_steps": 2, "target_quantile": 0.75}
    return {"name": "ddid", "ddpm_size": [size[0] // 4, size[1] // 4], "ddpm_channels": 64, "ddpm_levels": [1, 2, 2],
            "ddpm_blocks": 1, "ddpm_timesteps": 200, "ddpm_batch": 128, "ddpm_lr": 1.0e-3, "ddpm_ema": 0.995,
            "sample_steps": 25, "target_quantile": 0.75}


def plan(args, clock: Clock, split, device: str) -> dict:
    """Epochs per model (and DDPM steps) from measured step times, inside the budget."""
    from reidbench.data.sampler import PKSampler

    size = tuple(args.size)
    p, k = (4, 4) if args.toy else (16, 4)
    steps_per_epoch = len(PKSampler(split.train.pids, p=p, k=k, seed=0))
    num_classes = split.train.num_ids
    training_budget = TRAINING_SHARE * clock.left
    planned, probes = {}, {}
    for spec in MODELS:
        defense = ddid_defense(args.toy, size) if spec["name"] == "ddid" else spec["defense"]
        seconds = probe_step_seconds(defense, size, p, k, num_classes, device)
        probes[spec["name"]] = seconds
        budget = spec["share"] * training_budget
        entry = {"defense": dict(defense), "lr": spec["lr"], "step_s": seconds}
        if spec["name"] == "ddid":
            cams = int(torch.unique(split.train.camids).numel())
            ddpm_s = probe_ddpm_seconds(defense, num_classes, cams, device)
            probes["ddid-ddpm"] = ddpm_s
            # Half of DDID's share trains the DDPM; sampling (a few seconds at this size) and
            # the self-meta fine-tuning share the rest.
            entry["defense"]["ddpm_steps"] = max(10, int(0.5 * budget / ddpm_s))
            if args.toy:
                entry["defense"]["ddpm_steps"] = min(entry["defense"]["ddpm_steps"], 20)
            budget *= 0.4
        epochs = int(budget / max(seconds * steps_per_epoch, 1e-9))
        # a toy run checks the pipeline, not the numbers: a few epochs, whatever the probe says
        entry["epochs"] = max(1, min(TOY_EPOCHS if args.toy else spec["paper_epochs"], epochs))
        planned[spec["name"]] = entry
        log(f"plan {spec['name']}: {seconds * 1000:.1f} ms/step x {steps_per_epoch} steps/epoch -> "
            f"{entry['epochs']} epochs" + (f", DDPM {entry['defense']['ddpm_steps']} steps" if spec["name"] == "ddid" else ""))
    return {"models": planned, "probe_step_s": probes, "steps_per_epoch": steps_per_epoch, "p": p, "k": k}


def dataset_spec(args) -> dict:
    # the synthetic generator draws at its preset's own size (64x32 for tiny); --size must match it
    return {"name": "synthetic", "preset": "tiny"} if args.toy else \
        {"name": "market1501-trainsplit", "image_size": list(args.size)}


def model_id(name: str, toy: bool) -> str:
    return f"{BACKBONE}-{'toy' if toy else 'market1501-trainsplit'}-paper-{name}"


def write_zoo(args, planned: dict, surrogate_entry: dict) -> Path:
    size = list(args.size)
    dataset = dataset_spec(args)
    pretrained = {"file": args.pretrained_file, "sha256": args.pretrained_sha256, "layout": "torchvision"}
    base = model_id("none", args.toy)
    entries = []
    for spec in MODELS:
        model = planned["models"][spec["name"]]
        entry = {
            "id": model_id(spec["name"], args.toy), "backbone": BACKBONE, "dataset": dataset,
            "defense": model["defense"],
            # one model spec for all (init.from needs it equal); only the base, trained from
            # scratch, reads the ImageNet file
            "model": {"input_size": size, "last_stride": 1, "pretrained": pretrained},
            "recipe": {"epochs": model["epochs"], "batch": {"p": planned["p"], "k": planned["k"]}, "lr": model["lr"],
                       "warmup_epochs": min(10, max(1, model["epochs"] // 10)) if spec["name"] == "none" else 1,
                       "schedule": "cosine", "pad": 10 if not args.toy else 4},
            "suite": ["gpu-paper-scale"],
            "description": f"{spec['name']} at {size[0]}x{size[1]}, ImageNet MobileNetV2, planned by paper_scale.py",
        }
        if spec["name"] != "none":
            entry["init"] = {"from": base}
        entries.append(entry)
    entries.append(surrogate_entry)
    path = Path(args.out) / "zoo.yaml"
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def surrogate_for(args) -> dict:
    """The protocol's fixed surrogate entry for the dataset, exactly as the project's zoo has it."""
    from reidbench.protocol import load_protocol
    from reidbench.zoo import DEFAULT_ZOO

    dataset = "synthetic" if args.toy else "market1501-trainsplit"
    sid = load_protocol().surrogate(dataset)
    raw = yaml.safe_load(Path(DEFAULT_ZOO).read_text())
    entry = next(e for e in raw if e["id"] == sid)
    if args.toy:  # the tiny preset at toy size; the id stays the protocol's so transfer cells are defined
        entry = dict(entry, dataset={"name": "synthetic", "preset": "tiny"},
                     recipe=dict(entry["recipe"], epochs=1))
    return entry


def cmd_run(args) -> int:
    clock = Clock(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("REIDBENCH_CACHE", str(out / "cache"))
    os.environ.setdefault("REIDBENCH_QUIET", "1")
    from reidbench.data import build_dataset
    from reidbench.hardware import resolve_device
    from reidbench.grid import protocol_grid
    from reidbench.runner import Runner
    from reidbench.zoo import get_entry, load_zoo, obtain_weights

    device = resolve_device(args.device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timings = {"hardware": hardware(device), "budget_s": args.budget_s, "phases": []}

    def phase(name: str, started: float, **extra) -> None:
        timings["phases"].append({"phase": name, "seconds": round(time.time() - started, 1), **extra})
        (out / "timings.json").write_text(json.dumps(timings, indent=1))

    started = time.time()
    size = tuple(args.size)
    dataset = dataset_spec(args)
    split = build_dataset(dataset["name"], **{k: v for k, v in dataset.items() if k != "name"})
    phase("data", started, train_images=len(split.train), query=len(split.query), gallery=len(split.gallery))
    log(f"data: {len(split.train)} train / {len(split.query)} query / {len(split.gallery)} gallery at {size} "
        f"({clock.elapsed:.0f} s)")

    started = time.time()
    planned = plan(args, clock, split, device)
    timings["plan"] = planned
    phase("probe", started)
    zoo_path = write_zoo(args, planned, surrogate_for(args))
    zoo = load_zoo(zoo_path)
    runner = Runner(zoo, results_root=out / "results", device=device, batch_size=args.batch_size, progress=False)

    grid_attacks = [a for group in runner.protocol.raw["attacks"].values() for a in group]
    order = FIRST + [a for a in grid_attacks if a not in FIRST]
    done_cells: dict[str, list[str]] = {}
    cell_seconds: list[float] = []

    def run_cell(entry, attack) -> None:
        # Stop before a cell that would likely outlast the budget: its cost is guessed from
        # the slowest cell so far (the query-based and learned attacks cost most).
        guess = max(cell_seconds[-6:], default=10.0)
        if clock.left < max(guess, args.reserve_s):
            raise TimeoutError
        if not protocol_grid(runner.protocol, [entry], [attack], [runner.protocol.eps]) and attack != "oblivious":
            return
        cell_started = time.time()
        try:
            path = runner.run_cell(entry, attack, runner.protocol.eps)
        except Exception as exc:  # noqa: BLE001 - one failing cell must not cost the others
            log(f"cell {entry.id} / {attack} failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
            (out / "errors.log").open("a").write(f"{entry.id} {attack}\n{traceback.format_exc()}\n")
            return
        cell_seconds.append(time.time() - cell_started)
        if path is not None:
            done_cells.setdefault(entry.id, []).append(attack)
            phase(f"cell {entry.id} {attack}", cell_started)
            log(f"cell {entry.id} / {attack}: {cell_seconds[-1]:.1f} s ({clock.left:.0f} s left)")

    trained = []
    try:
        for spec in MODELS:
            entry = get_entry(zoo, model_id(spec["name"], args.toy))
            if clock.left < args.reserve_s + 30:
                log(f"not training {entry.id}: {clock.left:.0f} s left")
                break
            started = time.time()
            try:
                obtain_weights(entry, split, True, device, False, zoo=zoo)
            except Exception as exc:  # noqa: BLE001
                log(f"training {entry.id} failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
                (out / "errors.log").open("a").write(f"train {entry.id}\n{traceback.format_exc()}\n")
                continue
            phase(f"train {entry.id}", started, epochs=planned["models"][spec["name"]]["epochs"])
            log(f"trained {entry.id} in {time.time() - started:.0f} s ({clock.left:.0f} s left)")
            trained.append(entry)
            for attack in FIRST:
                run_cell(entry, attack)
        for attack in order:
            for entry in trained:
                if attack not in done_cells.get(entry.id, []):
                    run_cell(entry, attack)
    except TimeoutError:
        log(f"budget reached with {clock.left:.0f} s left; stopping with the cells done so far")
    except KeyboardInterrupt:  # the wrapper's timeout: finished cells and epochs are on disk
        log(f"interrupted after {clock.elapsed:.0f} s; the table holds the cells finished so far")
    timings["cells_done"] = done_cells
    timings["elapsed_s"] = round(clock.elapsed, 1)
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    write_table(out)
    return 0


def _cell_value(record: CellRecord, key: str) -> tuple[float, float]:
    block = record.metrics(key) or Metrics()
    return block.rank1, block.mAP


def write_table(out: Path) -> Path:
    """``paper_scale.md``: the hardware, the time of each phase and one row per model (clean,
    then Rank-1 / mAP under each attack that ran), from the records under ``out/results``."""
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    from reidbench.results import iter_cells

    records = {}
    for _, record in iter_cells(out / "results"):
        records.setdefault(record.model.id, {})[record.attack_id] = record
    attacks = sorted({a for cells in records.values() for a in cells})
    lines = ["# Paper scale on one GPU (benchmarks/gpu/paper_scale.py)", ""]
    hw = timings.get("hardware", {})
    lines.append("Hardware: " + ", ".join(f"{k} {v}" for k, v in hw.items()))
    lines.append(f"Budget {timings.get('budget_s')} s, used {timings.get('elapsed_s')} s.")
    lines.append("")
    plan_models = (timings.get("plan") or {}).get("models", {})
    if plan_models:
        lines += ["| model | planned epochs | ms per step | DDPM steps |", "| --- | --- | --- | --- |"]
        for name, entry in plan_models.items():
            lines.append(f"| {name} | {entry['epochs']} | {entry['step_s'] * 1000:.1f} | "
                         f"{entry['defense'].get('ddpm_steps', '')} |")
        lines.append("")
    lines += ["| phase | seconds |", "| --- | --- |"]
    lines += [f"| {p['phase']} | {p['seconds']} |" for p in timings.get("phases", []) if not p["phase"].startswith("cell ")]
    lines.append("")
    header = ["model", "clean R1 / mAP"] + [f"{a} R1 / mAP" for a in attacks]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model, cells in records.items():
        first = next(iter(cells.values()))
        row = [model, "{:.1f} / {:.1f}".format(*(100 * v for v in _cell_value(first, "clean")))]
        for attack in attacks:
            cell = cells.get(attack)
            row.append("—" if cell is None else "{:.1f} / {:.1f}".format(*(100 * v for v in _cell_value(cell, "attacked"))))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Rank-1 and mAP in %, plain (not re-ranked) distances; '—': not run within the budget.")
    path = out / "paper_scale.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"table: {path}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", required=True)
    run.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget of the whole run")
    run.add_argument("--reserve-s", type=float, default=15.0, help="stop starting work with this much left")
    run.add_argument("--device", default="auto")
    run.add_argument("--size", type=int, nargs=2, default=[256, 128])
    run.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    run.add_argument("--toy", action="store_true", help="tiny synthetic data at toy size (CPU test)")
    run.add_argument("--pretrained-file", default=IMAGENET_FILE)
    run.add_argument("--pretrained-sha256", default=IMAGENET_SHA256)
    table = sub.add_parser("table")
    table.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "table":
        write_table(Path(args.out))
        return 0
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
