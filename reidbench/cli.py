"""The ``reidbench`` command line. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ReIDBenchError

ZOO_HELP = "model zoo file (default: ./model_zoo.yaml if present, else the one shipped with reidbench)"


def _zoo(args):
    from .zoo.schema import load_zoo

    return load_zoo(args.zoo)


def _entries(args, zoo):
    from .zoo.schema import get_entry

    if args.model:
        return [get_entry(zoo, m) for m in args.model]
    suites = set(args.suite)
    entries = [e for e in zoo.values() if "all" in suites or suites & set(e.suite)]
    if not entries:
        raise ReIDBenchError(f"no zoo entry belongs to suite(s) {sorted(suites)}")
    return entries


def _runner(args, zoo):
    from .executors import RunSpec

    return RunSpec.from_args(args).runner(zoo)


def cmd_run(args) -> int:
    from .executors import RunSpec, build_executor
    from .leaderboard import render_site
    from .progress import log
    from .protocol import load_protocol
    from .registry import ATTACKS
    from .sweep import unswept

    if args.onnx:
        return _run_onnx(args)
    if not args.all and not args.model:
        raise ReIDBenchError("say what to run: --all, or --model ID [--attack NAME], or --onnx FILE")
    for name in args.attack or []:
        ATTACKS.get(name)
    protocol = load_protocol(args.protocol) if args.protocol else load_protocol()
    zoo = _zoo(args)
    entries = _entries(args, zoo)
    attacks = args.attack or protocol.attacks()
    eps_values = [e / 255.0 for e in args.eps] if args.eps else None
    if eps_values and any(not (0 < e <= 1) for e in eps_values):
        raise ReIDBenchError(f"--eps is in 1/255 units and must lie in (0, 255], got {args.eps}")
    spec = RunSpec.from_args(args)  # checks --dataset (a name or a mapping) before any work
    if args.queries is not None and args.queries < 1:
        raise ReIDBenchError(f"--queries must be a positive number of queries, got {args.queries}")
    if args.attack:
        # The protocol's grid skips cells it does not define; a named attack must run.
        from .grid import undefined_cell

        for entry in entries:
            for name in attacks:
                reason = undefined_cell(protocol, name, spec.test_dataset_name or entry.dataset_name, entry.defense)
                if reason:
                    raise ReIDBenchError(f"cannot run '{name}' on model '{entry.id}': {reason}; leave it out of --attack")
    executor = build_executor(args.executor, args.address, args.jobs)
    # Without --attack: the protocol's whole suite (grid.protocol_grid), secondary ε included.
    executor.run(spec, [e.id for e in entries], args.attack, eps_values, zoo=zoo)
    index = render_site(Path(args.results), Path(args.site) if args.site else None, protocol.version)
    log(f"leaderboard: {index}")
    if spec.test_dataset_name is None and args.queries is None and (missing := unswept(Path(args.results), protocol, entries)):
        which = f"--all --suite {' '.join(args.suite)}" if args.all else " ".join(missing)
        log(f"budget sweep: {len(missing)} defended model(s) without a sweep of their current weights "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); their flag column stays empty until "
            f"'reidbench sweep {which} --results {args.results}'")
    return 0


def _run_onnx(args) -> int:
    """``run --onnx FILE``: an ONNX model benchmarked without a zoo entry (reidbench.benchmark)."""
    from rich.console import Console
    from rich.table import Table

    from .api import benchmark
    from .data import dataset_spec
    from .leaderboard import render_site
    from .progress import log

    if args.all or args.model:
        raise ReIDBenchError("--onnx names the model to run; drop --all / --model")
    if not args.dataset or not args.input_size:
        raise ReIDBenchError("--onnx needs --dataset NAME and --input-size H W (what the graph takes)")
    if args.no_train or args.train_missing or args.executor != "local":
        raise ReIDBenchError("--onnx runs locally and trains nothing; drop --no-train / --train-missing / --executor")
    dataset = dataset_spec(args.dataset, "--dataset")
    frame = benchmark(args.onnx, dataset=dataset, attacks=args.attack, eps=args.eps, input_size=args.input_size,
                      mean=args.mean, std=args.std, device=args.device, queries=args.queries, name=args.name,
                      results=args.results, zoo=args.zoo, batch_size=args.batch_size, rerank=not args.no_rerank,
                      force=args.force, channel_order=args.channel_order, value_range=args.value_range,
                      layout=args.layout)
    table = Table(title=f"{Path(args.onnx).name} on {dataset['name']}")
    for column in ("", "Rank-1", "mAP", "queries"):
        table.add_column(column, justify="right")
    for label, row in frame.iterrows():
        table.add_row(str(label), *(f"{100 * row[k]:.1f}" for k in ("rank1", "mAP")), str(row["queries"]))
    Console().print(table)  # the command's result: stdout
    log(f"leaderboard: {render_site(Path(args.results), Path(args.site) if args.site else None)}")
    return 0


def cmd_train(args) -> int:
    from .data import build_dataset
    from .hardware import resolve_device
    from .progress import log
    from .zoo.schema import ZooEntry, get_entry, training_entry
    from .zoo.training import train_entry

    zoo = _zoo(args)
    if args.model:
        entry = get_entry(zoo, args.model)
    else:
        if not (args.defense and args.dataset):
            raise ReIDBenchError("say what to train: --model ID, or --defense NAME --dataset NAME")
        from .registry import DATASETS, DEFENSES

        DEFENSES.get(args.defense)
        DATASETS.get(args.dataset)
        matches = [e for e in zoo.values() if e.defense["name"] == args.defense and e.dataset_name == args.dataset
                   and (args.backbone is None or e.backbone == args.backbone)]
        if len(matches) >= 1 and args.backbone is None:
            # Prefer the recipe written for this device class (the GPU entries carry "gpu" in their suite).
            gpu = args.device.startswith("cuda")
            matches.sort(key=lambda e: ("gpu" in e.suite) != gpu)
        entry = matches[0] if matches else ZooEntry(
            id=f"{args.backbone or 'resnet18'}-{args.dataset}-{args.defense}", backbone=args.backbone or "resnet18",
            dataset={"name": args.dataset}, defense={"name": args.defense})
    trainer = training_entry(entry, zoo)
    if trainer is not entry:
        log(f"{entry.id} uses the weights of {trainer.id}; training that")
        entry = trainer
    if args.epochs:
        entry.recipe = {**entry.recipe, "epochs": args.epochs}
    split = build_dataset(entry.dataset_name, **entry.dataset_options)
    weights = train_entry(entry, split, device=resolve_device(args.device), zoo=zoo)
    log(f"trained {entry.id}: {weights}")
    return 0


def cmd_eval(args) -> int:
    from rich.table import Table

    from .data import dataset_spec
    from .leaderboard import with_interval
    from .progress import console
    from .runner import rank_metrics
    from .metrics import k_reciprocal_rerank, pairwise_distance
    from .zoo.schema import get_entry

    zoo = _zoo(args)
    entry = get_entry(zoo, args.model)
    if args.weights:  # e.g. a checkpoint of an unfinished run: last.safetensors
        entry.weights = {"path": str(Path(args.weights).resolve())}
    runner = _runner(args, zoo)
    bundle = runner.bundle(entry, dataset_spec(args.dataset, "--dataset") if args.dataset else None)
    feats = runner.clean_features(bundle)
    q_g = pairwise_distance(feats["query"], feats["gallery"])
    rows = [("plain", rank_metrics(q_g, bundle.split, runner.protocol)[0])]
    if runner.rerank:
        rr = k_reciprocal_rerank(q_g, pairwise_distance(feats["query"], feats["query"]), feats["g_g"], **runner.protocol.rerank)
        rows.append(("re-ranked", rank_metrics(rr, bundle.split, runner.protocol)[0]))
    table = Table(title=f"{entry.id} on {bundle.split.name} (split {bundle.split.split_hash})")
    for column in ("distance", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"):
        table.add_column(column, justify="right")
    for label, m in rows:
        ci = m.get("ci95") or {}
        table.add_row(label, *(with_interval(m[k], ci.get(k)) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")))
    console.print(table)
    console.print("a ± b: half the width of the 95% interval (bootstrap over test identities)")
    return 0


def cmd_list(args) -> int:
    from .registry import ATTACKS, DATASETS, DEFENSES

    if args.what == "models":
        for entry in _zoo(args).values():
            print(f"{entry.id}\t{entry.backbone}\t{entry.dataset_name}\t{entry.defense['name']}\t{','.join(entry.suite)}")
        return 0
    registry = {"datasets": DATASETS, "attacks": ATTACKS, "defenses": DEFENSES}[args.what]
    roles = {}
    if args.what == "attacks":  # where each attack stands in the current protocol
        from .protocol import load_protocol

        protocol = load_protocol()
        groups = protocol.raw.get("attacks", {})
        roles = {name: f"grid ({group})" for group, names in groups.items() for name in names}
        roles.update({name: "variant" for name in protocol.variants})
    for name in registry.names():
        doc = (registry.get(name).__doc__ or "").strip().splitlines()
        role = f"{roles.get(name, '-')}\t" if args.what == "attacks" else ""
        print(f"{name}\t{role}{doc[0] if doc else ''}")
    return 0


def cmd_zoo_list(args) -> int:
    from .hub import zoo_rows

    print("id\tbackbone\tdataset\tdefense\tweights\tlocal")
    for row in zoo_rows(_zoo(args)):
        print("\t".join(row))
    return 0


def cmd_zoo_pull(args) -> int:
    from .hardware import resolve_device
    from .cache import sha256_file
    from .zoo.schema import get_entry
    from .zoo.training import obtain_weights

    zoo = _zoo(args)
    entry = get_entry(zoo, args.model)
    path = obtain_weights(entry, train_missing=args.train_missing, train_if_unreachable=args.train_missing,
                          device=resolve_device(args.device), zoo=zoo)
    print(f"{entry.id}\t{path}\tsha256 {sha256_file(path)}")
    return 0


def cmd_zoo_push(args) -> int:
    from .hub import push
    from .zoo.schema import get_entry

    zoo = _zoo(args)
    result = push(get_entry(zoo, args.model), zoo, args.repo, Path(args.results), private=args.private)
    print(f"pushed {args.model} to {result.repo} at revision {result.revision} (sha256 {result.sha256})")
    print(f"pin it in the zoo entry:\n  {result.zoo_weights()}")
    return 0


def cmd_render(args) -> int:
    from .leaderboard import render_site
    from .progress import log
    from .protocol import load_protocol

    version = load_protocol(args.protocol).version if args.protocol else load_protocol().version
    if not Path(args.results).is_dir():  # a mistyped --results would render an empty leaderboard
        raise ReIDBenchError(f"no result store at {args.results} (write one with 'reidbench run', or pass --results)")
    log(f"leaderboard: {render_site(Path(args.results), Path(args.site) if args.site else None, version)}")
    return 0


def cmd_sweep(args) -> int:
    from .leaderboard import render_site
    from .protocol import load_protocol
    from .runner import Runner
    from .sweep import defended_ids, report

    zoo = _zoo(args)
    chosen = defended_ids(zoo, args.suite) if args.all else []
    if args.all and not chosen:
        raise ReIDBenchError(f"no defended zoo entry belongs to suite(s) {sorted(args.suite or ['all'])}")
    ids = list(dict.fromkeys(list(args.model) + chosen))
    runner = Runner(zoo, results_root=Path(args.results), device=args.device, progress=True, rerank=False,
                    protocol=load_protocol(args.protocol) if args.protocol else load_protocol())
    report(runner, ids, args.iterations, args.attack, args.rerun_floor, "reidbench sweep " + " ".join(args.argv),
           args.force)
    if not args.no_render:
        print(f"leaderboard: {render_site(Path(args.results), Path(args.site) if args.site else None, runner.protocol.version)}")
    return 0


def cmd_validate(args) -> int:
    from .validate import print_verdict, validate_entry

    verdict = validate_entry(args.entry, _zoo(args), Path(args.results), args.tolerance, args.device)
    print_verdict(verdict)
    for reason in verdict.reasons:
        print(f"reidbench: rejected: {reason}", file=sys.stderr)
    return 0 if verdict.accepted else 1


def cmd_zoo_changed(args) -> int:
    from .validate import submitted_entries

    for entry_id in submitted_entries(args.base, args.zoo, args.results):
        print(entry_id)
    return 0


def cmd_cache_verify(args) -> int:
    from .cache import cache_dir, remove, verify_tree
    from .results import iter_cells, per_query_problem

    root = cache_dir()
    checked = unchecked = 0
    damaged = []
    for path, problem in verify_tree(root):
        if problem == "unchecked":
            unchecked += 1
        elif problem is not None:
            damaged.append((path, problem))
        checked += 1
    if args.results:
        for path, record in iter_cells(Path(args.results)):
            checked += 1
            problem = per_query_problem(path, record) if record.per_query is not None else None
            if problem is not None:
                damaged.append((path.with_suffix(".npz"), problem))
    for path, problem in damaged:
        print(f"damaged\t{path}\t{problem}")
        if args.delete:
            remove(path)
    print(f"{checked} files checked under {root}{' and ' + args.results if args.results else ''}: {len(damaged)} damaged"
          f"{' (deleted; rebuilt when next needed)' if args.delete and damaged else ''}, "
          f"{unchecked} written before size and hash were recorded")
    return 1 if damaged else 0


def cmd_cache_clean(args) -> int:
    from .cache import cache_dir, remove

    root = cache_dir()
    if args.model:
        from .zoo.schema import get_entry
        from .zoo.weights import trained_weights_dir

        zoo = _zoo(args)
        targets = []
        for model_id in args.model:
            entry = get_entry(zoo, model_id)
            # Every recipe this entry was ever trained with, not just today's.
            targets += sorted(trained_weights_dir(entry).parent.glob(f"{entry.id}-*"))
    else:
        targets = sorted(root.iterdir()) if root.is_dir() else []
    for path in targets:
        remove(path)
        print(f"removed\t{path}")
    print(f"{len(targets)} cache entries removed from {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reidbench", description="Adversarial robustness benchmark for person re-identification")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, results=True):
        p.add_argument("--zoo", default=None, help=ZOO_HELP)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
        if results:
            p.add_argument("--results", default="results", help="result store folder (default: ./results)")
            p.add_argument("--batch-size", type=int, default=128)
            p.add_argument("--no-rerank", action="store_true", help="skip k-reciprocal re-ranked metrics")
            p.add_argument("--no-train", action="store_true", help="fail instead of training a model without weights")
            p.add_argument("--train-missing", action="store_true",
                           help="also train an entry from its recipe when its hub weights cannot be reached")
            p.add_argument("--force", action="store_true", help="recompute cells even when their inputs did not change")

    from .executors import EXECUTORS

    run = sub.add_parser("run", help="run protocol cells and render the leaderboard")
    run.add_argument("--all", action="store_true", help="every model of the chosen suite(s) against every protocol attack")
    run.add_argument("--suite", nargs="+", default=["default"], help="zoo suites for --all (default: default; 'all' for every entry)")
    run.add_argument("--model", nargs="+", help="zoo model id(s)")
    run.add_argument("--attack", nargs="+", help="attack name(s) (default: the protocol's suite)")
    run.add_argument("--eps", nargs="+", type=float, help="budget(s) in 1/255 units (default: the protocol's primary ε)")
    run.add_argument("--dataset", default=None,
                     help="evaluate on this dataset instead of each model's own (cross-dataset; with --onnx, the one "
                          "to evaluate on): a name, or a mapping as in a zoo entry ('{name: synthetic, preset: tiny}')")
    onnx = run.add_argument_group("an ONNX model without a zoo entry (with --dataset)")
    onnx.add_argument("--onnx", metavar="FILE", help="benchmark this ONNX graph (pip install 'reidbench[onnx]')")
    onnx.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="the graph's input height and width")
    onnx.add_argument("--channel-order", choices=("RGB", "BGR"), default=None, help="the graph's channel order (RGB)")
    onnx.add_argument("--value-range", type=int, choices=(1, 255), default=None,
                      help="what a white pixel is for the graph (1)")
    onnx.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean, in the graph's order and range")
    onnx.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std, in the graph's order and range")
    onnx.add_argument("--layout", choices=("NCHW", "NHWC"), default=None, help="the graph's input layout (NCHW)")
    onnx.add_argument("--name", default=None, help="model id in the results (default: file name + hash)")
    run.add_argument("--queries", type=int, default=None, metavar="N",
                     help="evaluate a fixed, seeded subset of N queries (recorded; ranked apart from full runs)")
    run.add_argument("--site", default=None, help="where to render the leaderboard (default: ./leaderboard/site)")
    run.add_argument("--protocol", default=None, metavar="VERSION",
                     help="protocol version to run under (default: the current one; other versions render apart)")
    run.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: every cell in this process (default); processes: on --jobs local worker processes; "
                          "ray: cells as Ray tasks (pip install 'reidbench[ray]')")
    run.add_argument("--jobs", type=int, default=2, metavar="N",
                     help="with --executor processes: how many worker processes (default: 2)")
    run.add_argument("--address", default=None,
                     help="with --executor ray: the cluster to join (auto, ray://host:10001); default: start a local Ray")
    common(run)
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train a zoo model (or a defense on a dataset) with the shared loop")
    train.add_argument("--model", help="zoo model id")
    train.add_argument("--defense", help="defense name (with --dataset)")
    train.add_argument("--dataset", help="dataset name (with --defense)")
    train.add_argument("--backbone", default=None, help="timm backbone for an ad-hoc model")
    train.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    common(train, results=False)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="clean evaluation of a zoo model, on its own or another dataset")
    ev.add_argument("--model", required=True)
    ev.add_argument("--dataset", default=None,
                    help="evaluate on this dataset instead (cross-dataset): a name, or a mapping as in a zoo entry")
    ev.add_argument("--weights", default=None, help="evaluate this weights file instead of the entry's")
    common(ev)
    ev.set_defaults(func=cmd_eval)

    ls = sub.add_parser("list", help="list registered datasets, models, attacks or defenses")
    ls.add_argument("what", choices=["datasets", "models", "attacks", "defenses"])
    ls.add_argument("--zoo", default=None)
    ls.set_defaults(func=cmd_list)

    zoo = sub.add_parser("zoo", help="the model zoo and the Hugging Face Hub: list, pull, push weights; changed entries")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_list = zoo_sub.add_parser("list", help="every entry, where its weights are, and whether they are here now")
    zoo_list.add_argument("--zoo", default=None)
    zoo_list.set_defaults(func=cmd_zoo_list)
    pull = zoo_sub.add_parser("pull", help="fetch an entry's weights into the hub cache (sha256 checked)")
    pull.add_argument("model", help="zoo model id")
    pull.add_argument("--train-missing", action="store_true",
                      help="train the entry from its recipe when it has no weights or the hub cannot be reached")
    common(pull, results=False)
    pull.set_defaults(func=cmd_zoo_pull)
    push = zoo_sub.add_parser("push", help="upload an entry's weights and a model card to a hub repo")
    push.add_argument("model", help="zoo model id")
    push.add_argument("--repo", required=True, help="OWNER/NAME on the Hugging Face Hub (created if missing)")
    push.add_argument("--results", default="results", help="result store whose numbers go into the model card")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--zoo", default=None)
    push.set_defaults(func=cmd_zoo_push)

    render = sub.add_parser("render", help="render the leaderboard from the result store")
    render.add_argument("--results", default="results")
    render.add_argument("--site", default=None)
    render.add_argument("--protocol", default=None, metavar="VERSION",
                        help="the version whose cells make the site (default: the current one; others render apart)")
    render.set_defaults(func=cmd_render)

    from .validate import DEFAULT_TOLERANCE, SUBSET_SIZE, VALIDATION_ATTACK

    sw = sub.add_parser("sweep", help="the budget sweep: rerun a defended model's strongest white-box attack at "
                        "more iterations and flag it when Rank-1 keeps falling")
    sw.add_argument("model", nargs="*", help="zoo model id(s)")
    sw.add_argument("--all", action="store_true", help="every defended zoo model (of --suite)")
    sw.add_argument("--suite", nargs="+", default=None, help="with --all: only the models of these suites")
    sw.add_argument("--attack", default=None, help="attack to sweep (default: the strongest white-box one in the store)")
    sw.add_argument("--iterations", type=int, nargs="+", default=[15, 100, 500])
    sw.add_argument("--protocol", default=None, help="protocol version (default: the current one)")
    sw.add_argument("--results", default="results", help="result store folder (default: ./results)")
    sw.add_argument("--site", default=None, help="where to render the leaderboard (default: ./leaderboard/site)")
    sw.add_argument("--no-render", action="store_true", help="write the findings only")
    sw.add_argument("--zoo", default=None, help=ZOO_HELP)
    sw.add_argument("--device", default="auto")
    sw.add_argument("--rerun-floor", action="store_true",
                    help="attack a model even when its strongest stored cell is at the floor")
    sw.add_argument("--force", action="store_true", help="sweep again models whose current finding answers the request")
    sw.set_defaults(func=cmd_sweep)

    val = sub.add_parser(
        "validate", help="check a submitted zoo entry: pinned weights, its records, numbers recomputed on a query subset",
        description=f"Accept or reject the results of a zoo entry (exit 0 or 1, one line per reason): its weights must "
                    f"match their pinned sha256, its records the protocol, and clean and {VALIDATION_ATTACK} Rank-1 / mAP, "
                    f"recomputed on the committed validation queries (up to {SUBSET_SIZE} per split), must agree with "
                    f"the submitted per-query files within the tolerance.")
    val.add_argument("entry", metavar="ENTRY", help="zoo model id")
    val.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                     help="largest accepted |submitted - recomputed|, absolute, in percentage points of Rank-1 and of "
                          f"mAP (default: {DEFAULT_TOLERANCE:g})")
    val.add_argument("--results", default="results", help="folder holding the submitted results (default: ./results)")
    common(val, results=False)
    val.set_defaults(func=cmd_validate)

    cache = sub.add_parser("cache", help="the local cache ($REIDBENCH_CACHE, default ~/.cache/reidbench): verify, clean")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    verify = cache_sub.add_parser("verify", help="check every cached file against the size and sha256 recorded when "
                                                 "it was written; exit 1 if any is damaged")
    verify.add_argument("--delete", action="store_true", help="delete damaged files (each is rebuilt when next needed)")
    verify.add_argument("--results", default=None, help="also check the per-query files of this result folder")
    verify.set_defaults(func=cmd_cache_verify)
    clean = cache_sub.add_parser("clean", help="delete the cache, or only the trained weights of some zoo entries")
    clean.add_argument("--model", nargs="+", help="zoo model id(s) whose trained weights (every recipe) to delete")
    clean.add_argument("--zoo", default=None)
    clean.set_defaults(func=cmd_cache_clean)

    changed = zoo_sub.add_parser("changed", help="ids of the zoo entries a branch submits, one per line (for CI)")
    changed.add_argument("--base", default="origin/main", help="git ref of the base branch (default: origin/main)")
    changed.add_argument("--zoo", default=None, help=ZOO_HELP)
    changed.add_argument("--results", default="submissions",
                         help="submitted result folder; entries whose files changed there count too (default: submissions)")
    changed.set_defaults(func=cmd_zoo_changed)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # as typed after the subcommand, for the commands a result records
    try:
        return args.func(args)
    except ReIDBenchError as exc:
        print(f"reidbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reidbench: interrupted; finished cells and checkpoints are saved, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
