"""Where the protocol grid runs: in this process (``local``, the default) or as Ray tasks (``ray``).

Both executors take the same plain-data description of a run (:class:`RunSpec`: the zoo file,
the result folder, the runner's options) and the same grid (entries × attacks × budgets), and
both write through :meth:`reidbench.runner.Runner.run_cell`, so a cell's file is the same
whichever ran it and a cell already in the store is skipped by either.

The Ray executor first submits one training task per model whose weights the grid needs (each
entry's own, the one it borrows with ``weights.from``, and the protocol's transfer surrogate
for attacks that need it), then every cell as a task that takes those trainings as arguments:
Ray starts a cell only once its models exist, and no model is trained twice at the same time.
A task asks for one GPU when the run's device is CUDA (``auto`` on a cluster that has GPUs).
Workers rebuild everything from the spec (no live objects cross processes) and keep one
Runner per spec, so a worker computes a model's clean gallery features once for all the cells
it runs. Results equal the local executor's because every random draw of a cell is seeded
from the protocol: the clean features once per model, the attack and the defense's transform
once per batch, from the batch's position.

Ray is an optional dependency: ``pip install 'reidbench[ray]'``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ReIDBenchError
from .progress import log, run_progress

EXECUTORS = ("local", "processes", "ray")
# Settings a worker on another machine of the cluster must share with the driver.
_FORWARDED_ENV = ("REIDBENCH_CACHE", "REIDBENCH_DATA", "REIDBENCH_QUIET")


@dataclass(frozen=True)
class RunSpec:
    """Everything a process needs to rebuild the runner: paths (absolute) and options."""

    zoo: Optional[str]
    results: str
    device: str = "auto"
    batch_size: int = 128
    rerank: bool = True
    train_missing: bool = True
    force: bool = False
    progress: bool = True
    train_if_unreachable: bool = False
    dataset: Optional[dict] = None  # cross-dataset: evaluate every entry on this dataset ({"name": ..., **options})
    protocol: Optional[str] = None  # protocol version; None: the current one
    queries: Optional[int] = None  # a seeded subset of this many queries (Runner.queries)

    @property
    def test_dataset(self) -> Optional[dict]:
        return dict(self.dataset) if self.dataset else None

    @property
    def test_dataset_name(self) -> Optional[str]:
        return self.dataset["name"] if self.dataset else None

    @classmethod
    def from_args(cls, args) -> "RunSpec":
        from .data import dataset_spec

        if args.no_train and getattr(args, "train_missing", False):
            raise ReIDBenchError("--no-train and --train-missing contradict each other; drop one")
        dataset = getattr(args, "dataset", None)  # a name or a YAML mapping, as in a zoo entry
        return cls(zoo=str(Path(args.zoo).resolve()) if args.zoo else None, results=str(Path(args.results).resolve()),
                   device=args.device, batch_size=args.batch_size, rerank=not args.no_rerank,
                   train_missing=not args.no_train, force=args.force,
                   train_if_unreachable=getattr(args, "train_missing", False),
                   dataset=dataset_spec(dataset, "--dataset") if dataset else None,
                   protocol=getattr(args, "protocol", None),
                   queries=getattr(args, "queries", None))

    def runner(self, zoo: Optional[dict] = None):
        from .protocol import load_protocol
        from .runner import Runner
        from .zoo.schema import load_zoo

        return Runner(zoo if zoo is not None else load_zoo(self.zoo), results_root=Path(self.results),
                      protocol=load_protocol(self.protocol) if self.protocol else None,
                      device=self.device, train_missing=self.train_missing, batch_size=self.batch_size,
                      rerank=self.rerank, progress=self.progress, force=self.force,
                      train_if_unreachable=self.train_if_unreachable, queries=self.queries)


class LocalExecutor:
    """Every cell in this process, one after the other (models and features stay in memory)."""

    def run(self, spec: RunSpec, entry_ids: list[str], attacks: Optional[list[str]] = None,
            eps_values: Optional[list[float]] = None,
            zoo: Optional[dict] = None) -> list[Path]:
        runner = spec.runner(zoo)
        return runner.run([runner.zoo[i] for i in entry_ids], attacks, eps_values, spec.test_dataset)


def training_dependencies(zoo: dict, model_id: str) -> list[str]:
    """The zoo ids whose trained weights ``model_id``'s training starts from or reads: its
    ``init.from`` base and the entries its defense names (APD's frozen feature network)."""
    from .zoo.schema import get_entry

    entry = get_entry(zoo, model_id)
    deps = [entry.init["from"]] if entry.init else []
    deps += [ref["from"] for ref in entry.references.values()]
    return list(dict.fromkeys(deps))


class ProcessExecutor:
    """The grid on ``jobs`` local worker processes of ``cores // jobs`` threads each.

    A small network splits badly over threads: two single-threaded workers pass somewhat more
    images than one process with two threads on a quiet machine, and far more when other jobs
    load the cores (benchmarks/results/default-scale.md). Models are trained first, each
    once and only after the models it starts from; then each model's cells go to one worker
    as one task, so its clean features are computed once. Every random draw is seeded from
    the protocol, so a cell's numbers do not depend on which worker ran it (floating-point
    sums may differ in the last bits with the thread count, as on another machine)."""

    def __init__(self, jobs: int = 2):
        if int(jobs) < 1:
            raise ReIDBenchError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = int(jobs)

    def run(self, spec: RunSpec, entry_ids: list[str], attacks: Optional[list[str]] = None,
            eps_values: Optional[list[float]] = None,
            zoo: Optional[dict] = None) -> list[Path]:
        from .grid import protocol_grid

        zoo, protocol, needed = _plan(spec, entry_ids, attacks, zoo)
        # Every model a training needs, its own bases included, each with what must exist first.
        deps, pending = {}, [m for models in needed.values() for m in models]
        while pending:
            model = pending.pop()
            if model not in deps:
                deps[model] = training_dependencies(zoo, model)
                pending += deps[model]
        cells: dict[str, list[tuple[str, float]]] = {}
        for entry, name, eps in protocol_grid(protocol, [zoo[i] for i in entry_ids], attacks, eps_values,
                                              spec.test_dataset_name):
            cells.setdefault(entry.id, []).append((name, eps))

        from concurrent.futures.process import BrokenProcessPool  # a worker killed, or out of memory

        try:
            return self._run(spec, deps, cells)
        except BrokenProcessPool:
            raise ReIDBenchError("a worker process died (killed, or out of memory); every cell finished so far is "
                                 "kept: run the same command again to continue") from None

    def _run(self, spec: RunSpec, deps: dict, cells: dict) -> list[Path]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        from .registry import ATTACKS
        from .runner import attack_id

        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        worker_spec = dataclasses.replace(spec, progress=False)
        paths: dict[tuple[str, str], Path] = {}
        total = len(deps) + sum(len(entry_cells) for entry_cells in cells.values())
        # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang.
        with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(threads,)) as pool, \
                run_progress(total, "trainings + cells", enabled=spec.progress) as advance:
            done_models: set[str] = set()
            running: dict = {}
            queue = [m for m in deps]
            while queue or running:
                for model in [m for m in queue if all(d in done_models for d in deps[m])]:
                    queue.remove(model)
                    running[pool.submit(prepare_model, worker_spec, model)] = model
                if not running:  # a dependency cycle cannot happen (the zoo refuses one); be safe
                    raise ReIDBenchError(f"cannot order the trainings of {sorted(queue)}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    model = running.pop(future)
                    status, message = future.result()
                    if status == "error":
                        raise ReIDBenchError(message)
                    done_models.add(model)
                    log(f"[green]✓[/] {model}: weights ready")
                    advance()
            # What a surrogate-based attack learns or crafts (DMR's generator, on disk) serves every
            # target: one model's such cells run first, the others' once it is there, so that two
            # workers never train the same generator side by side.
            shares = {entry_id: [c for c in entry_cells if "surrogate" in ATTACKS.get(c[0]).needs_for()]
                      for entry_id, entry_cells in cells.items()}
            first = next((entry_id for entry_id, shared in shares.items() if shared), None)
            tasks = {}
            for entry_id, entry_cells in cells.items():
                batch = [c for c in entry_cells if c not in shares[entry_id]] + (shares[entry_id] if entry_id == first else [])
                tasks[pool.submit(run_cells, worker_spec, entry_id, batch)] = (entry_id, batch)
            held = {entry_id: shared for entry_id, shared in shares.items() if shared and entry_id != first}
            pending = set(tasks)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    entry_id, batch = tasks[future]
                    status, value = future.result()
                    if status == "error":
                        for other in pending:
                            other.cancel()
                        raise ReIDBenchError(value)
                    for (name, eps), path in zip(batch, value):
                        if path is not None:
                            paths[(entry_id, attack_id(name, eps))] = Path(path)
                            log(f"[green]✓[/] {entry_id} × {attack_id(name, eps)}")
                    advance(len(batch))
                    if entry_id == first:  # the shared artefacts exist now
                        for other_id, shared in held.items():
                            future = pool.submit(run_cells, worker_spec, other_id, shared)
                            tasks[future] = (other_id, shared)
                            pending.add(future)
                        held = {}
        return [paths[key] for key in ((e, attack_id(n, eps)) for e, cs in cells.items() for n, eps in cs)
                if key in paths]  # grid order, as the local executor


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# --- what runs inside a worker -----------------------------------------------------------------
_WORKER_RUNNERS: dict = {}


def _worker_runner(spec: RunSpec):
    if spec not in _WORKER_RUNNERS:
        _WORKER_RUNNERS[spec] = spec.runner()
    return _WORKER_RUNNERS[spec]


def prepare_model(spec: RunSpec, entry_id: str) -> tuple[str, str]:
    """Obtain (train, download or verify) one model's weights. Returns (status, message)."""
    try:
        runner = _worker_runner(spec)
        return "ok", runner.bundle(runner.zoo[entry_id]).weights_sha256
    except ReIDBenchError as exc:
        return "error", str(exc)


def run_cell(spec: RunSpec, entry_id: str, attack: str, eps: float, *models: tuple[str, str]) -> tuple[str, Optional[str]]:
    """One cell; ``models`` are the outcomes of the trainings it waited for."""
    for status, message in models:
        if status == "error":
            return status, message
    try:
        runner = _worker_runner(spec)
        path = runner.run_cell(runner.zoo[entry_id], attack, eps, spec.test_dataset)
        return "ok", str(path) if path is not None else None
    except ReIDBenchError as exc:
        return "error", str(exc)


def run_cells(spec: RunSpec, entry_id: str, cells: list[tuple[str, float]]) -> tuple[str, object]:
    """All of one model's cells, in order, in this worker (its features are computed once)."""
    try:
        runner = _worker_runner(spec)
        entry = runner.zoo[entry_id]
        return "ok", [None if (path := runner.run_cell(entry, name, eps, spec.test_dataset)) is None else str(path)
                      for name, eps in cells]
    except ReIDBenchError as exc:
        return "error", str(exc)


# --- the Ray driver ----------------------------------------------------------------------------
def models_needed(zoo: dict, entry_ids: list[str], attacks: list[str], protocol,
                  dataset: Optional[str] = None) -> dict[str, list[str]]:
    """For each entry of the grid, the zoo ids whose weights its cells need trained first:
    the entry whose recipe trains its weights and, when an attack needs one, the surrogate of
    the dataset the cells run on (``dataset``, or the entry's own)."""
    from .registry import ATTACKS
    from .zoo.schema import get_entry, training_entry

    surrogate_attacks = [name for name in attacks if "surrogate" in ATTACKS.get(name).needs_for()]
    needed = {}
    for entry_id in entry_ids:
        entry = get_entry(zoo, entry_id)
        models = [training_entry(entry, zoo).id]
        test_dataset = dataset or entry.dataset_name
        if surrogate_attacks and protocol.has_surrogate(test_dataset):
            surrogate = get_entry(zoo, protocol.surrogate(test_dataset))
            models.append(training_entry(surrogate, zoo).id)
        needed[entry_id] = list(dict.fromkeys(models))
    return needed


def _plan(spec: RunSpec, entry_ids: list[str], attacks: Optional[list[str]], zoo: Optional[dict]):
    """What a multi-process executor needs before it starts: the zoo, the protocol (attack
    names checked, so a typo fails before any work) and the models each entry's cells need."""
    from .protocol import load_protocol
    from .grid import check_attack_names
    from .zoo.schema import load_zoo

    zoo = zoo if zoo is not None else load_zoo(spec.zoo)
    protocol = load_protocol(spec.protocol) if spec.protocol else load_protocol()
    check_attack_names(attacks or protocol.attacks(), protocol)
    return zoo, protocol, models_needed(zoo, entry_ids, attacks or protocol.attacks(), protocol, spec.test_dataset_name)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ReIDBenchError("the ray executor needs Ray: pip install 'reidbench[ray]'") from None
    return ray


class RayExecutor:
    """Cells as Ray tasks, on a local Ray instance (``address=None``) or a cluster (``auto``,
    ``ray://host:10001``). The result folder and the cache must be shared by every node."""

    def __init__(self, address: Optional[str] = None):
        self.address = address

    def run(self, spec: RunSpec, entry_ids: list[str], attacks: Optional[list[str]] = None,
            eps_values: Optional[list[float]] = None,
            zoo: Optional[dict] = None) -> list[Path]:
        from .grid import protocol_grid
        from .runner import attack_id

        ray = _import_ray()
        zoo, protocol, needed = _plan(spec, entry_ids, attacks, zoo)

        started_here = not ray.is_initialized()
        if started_here:
            if self.address is None:  # a local instance: its workers inherit this environment
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
                ray.init(address=self.address, runtime_env={"env_vars": env} if env else None, log_to_driver=False)
        try:
            gpus = 1 if spec.device.startswith("cuda") or (
                spec.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1) else 0
            # Ray hands each GPU task its own device as cuda:0; progress bars would interleave.
            worker_spec = dataclasses.replace(spec, device="cuda" if gpus else "cpu", progress=False)
            prepare = ray.remote(prepare_model).options(num_gpus=gpus, num_cpus=1)
            cell = ray.remote(run_cell).options(num_gpus=gpus, num_cpus=1)
            # One task per model, however many entries share it: never two trainings of one model.
            models = dict.fromkeys(m for entry_models in needed.values() for m in entry_models)
            trained = {m: prepare.remote(worker_spec, m) for m in models}
            tasks = {}
            for entry, name, eps in protocol_grid(protocol, [zoo[i] for i in entry_ids], attacks, eps_values,
                                                  spec.test_dataset_name):
                ref = cell.remote(worker_spec, entry.id, name, eps, *(trained[m] for m in needed[entry.id]))
                tasks[ref] = (entry.id, attack_id(name, eps))
            return self._collect(ray, tasks)
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _collect(ray, tasks: dict) -> list[Path]:
        paths, pending = {}, list(tasks)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            status, value = ray.get(done[0])
            if status == "error":
                for ref in pending:
                    ray.cancel(ref)
                raise ReIDBenchError(value)
            if value is not None:
                entry_id, cell_id = tasks[done[0]]
                paths[done[0]] = Path(value)
                log(f"[green]✓[/] {entry_id} × {cell_id}")
        return [paths[ref] for ref in tasks if ref in paths]  # grid order, as the local executor


def build_executor(name: str, address: Optional[str] = None, jobs: int = 2):
    if name == "local":
        return LocalExecutor()
    if name == "processes":
        return ProcessExecutor(jobs)
    if name == "ray":
        return RayExecutor(address)
    raise ReIDBenchError(f"unknown executor '{name}' (known: {', '.join(EXECUTORS)})")
