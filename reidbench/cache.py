"""The local cache: where it is, how its files are keyed, written and read back.

Everything costly to rebuild (trained weights and their checkpoints, decoded datasets, the
synthetic data, learned attack generators, a defense's generated sets) is cached under
:func:`cache_dir`, keyed by a :func:`fingerprint` of what it depends on. A cached file is only
a copy, so it must never be trusted blindly: a full disk, a killed copy or a bad sector leave
a file that exists but is wrong. Hence:

* :func:`atomic_write` writes through a temporary file and a rename, and records the file's
  size and sha256 in a sidecar (``<name>.check``) *before* the rename, so a file that is
  present but does not match its sidecar was damaged after it was written;
* :func:`load_verified` checks size and hash, then loads; a file that fails either is
  reported in one warning line and deleted, and the caller rebuilds it (:func:`load_or_build`).
  Files written before sidecars existed are loaded as they are, and still rebuilt when they
  fail to load.

Result records are not cached artefacts (they are the benchmark's output and may be
committed); their per-query ``.npz`` is checked against the hash its JSON records
(:mod:`reidbench.results`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar, Union

from .errors import ReIDBenchError, first_line

T = TypeVar("T")

SIDECAR_SUFFIX = ".check"


class CorruptArtefact(ReIDBenchError, ValueError):
    """A file on disk that is not what was written (size or sha256 differ, or it does not load).
    A ValueError too, so that callers that already skip unreadable files skip it as well."""


def cache_dir() -> Path:
    """Where generated data, decoded images and trained weights are cached."""
    return Path(os.environ.get("REIDBENCH_CACHE", Path.home() / ".cache" / "reidbench")).expanduser()


def fingerprint(obj, length: int = 16) -> str:
    """A short stable key of a JSON-able description (dict keys sorted; other objects by str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def weights_fingerprint(model) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every state-dict tensor of an
    ``nn.Module``: two models share a fingerprint only if they compute the same function."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


Writer = Union[bytes, Callable[[Path], None]]


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` for a read-merge-write that
    several processes may do at once (two ``reidbench sweep`` runs on one result folder): without
    it the later writer silently drops what the earlier one merged in. The lock file stays (removing
    it would race with a waiting writer); it is hidden and git-ignored. Where ``fcntl`` is missing
    (Windows) the section runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_orphans(path: Path) -> None:
    """Temporary files of ``path`` left by writers that were killed (SIGKILL, power loss: no
    ``finally`` ran): a checkpoint's worth of disk each, removed by the next write."""
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = orphan.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            for leftover in (orphan, sidecar(orphan)):
                try:
                    leftover.unlink(missing_ok=True)
                except OSError:
                    pass  # someone else's to clean; the write itself goes on


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive, not ours to judge
        return True
    return True


def atomic_write(path: Path, data: Writer, best_effort: bool = False, check: bool = True,
                 fsync: bool = True) -> Optional[dict]:
    """Write ``data`` (bytes, or a function writing the file at the path it is given) to
    ``path`` so that readers only ever see a complete file; with ``check``, record its size and
    sha256 in the sidecar. Returns ``{"bytes", "sha256"}`` of what was written (only its size
    without ``check``).

    ``best_effort``: a failure to write (read-only or full disk) is one warning line and None,
    for a cache whose loss costs only time on the next run. ``fsync=False`` skips forcing the
    bytes to disk, for many small files that are cheap to write again (the site's pages)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        if isinstance(data, (bytes, bytearray, memoryview)):
            with open(tmp, "wb") as fh:
                fh.write(data)
        else:
            data(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        stamp = {"bytes": tmp.stat().st_size}
        if check:
            stamp["sha256"] = sha256_file(tmp)
            # The sidecar first: a crash between the two renames leaves a file that fails its
            # check (rebuilt), never an unchecked one.
            side, side_tmp = sidecar(path), sidecar(tmp)
            side_tmp.write_text(json.dumps(stamp) + "\n")
            os.replace(side_tmp, side)
        os.replace(tmp, path)
        return stamp
    except OSError as exc:
        if not best_effort:
            raise
        from .progress import log

        log(f"[yellow]warning:[/] could not write cache file {path}: {first_line(exc)} (it is rebuilt next time)")
        return None
    finally:
        for leftover in (tmp, sidecar(tmp)):  # an interrupted or failed write leaves nothing behind
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass


def save_torch(obj, path: Path, best_effort: bool = False) -> Optional[dict]:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp), best_effort=best_effort)


def save_safetensors(state: dict, path: Path, metadata: Optional[dict] = None, best_effort: bool = False,
                     check: bool = True) -> Optional[dict]:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        _canonical_header(tmp)

    return atomic_write(path, write, best_effort=best_effort, check=check)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted. The library writes them from
    a hash map, in an order that changes from one call to the next, so the same weights and
    metadata gave files with different bytes, and the weights' sha256 that every record
    carries changed with it. The data section is untouched (its offsets are relative to it)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # the same JSON with keys reordered has the same length, so it fits the same padded slot
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"safetensors header grew when canonicalised ({len(text)} > {size} bytes)")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


# Files already checked in this process, by (path, size, mtime): hashing a large decoded
# dataset once per process is enough.
_VERIFIED: set[tuple[str, int, int]] = set()


def check_file(path: Path) -> Optional[str]:
    """Why ``path`` is not the file its sidecar describes; None when it is, or when it has no
    sidecar (written before sidecars existed: nothing to check against)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        return first_line(exc)
    token = (str(path), stat.st_size, stat.st_mtime_ns)
    if token in _VERIFIED:
        return None
    side = sidecar(path)
    if not side.is_file():
        return None
    try:
        stamp = json.loads(side.read_text())
        expected_bytes, expected_sha = int(stamp["bytes"]), str(stamp["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its check file {side.name} is unreadable"
    if stat.st_size != expected_bytes:
        return f"{stat.st_size} bytes, {expected_bytes} were written"
    actual = sha256_file(path)
    if actual != expected_sha:
        return f"sha256 {actual[:12]}… differs from the {expected_sha[:12]}… written"
    _VERIFIED.add(token)
    return None


def has_sidecar(path: Path) -> bool:
    return sidecar(path).is_file()


def remove(path: Path) -> None:
    """Delete a cached file (or folder) and its sidecar."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def report_corrupt(path: Path, what: str, problem: str, action: str = "deleted, rebuilding it") -> None:
    from .progress import log

    log(f"[yellow]warning:[/] corrupt cached {what} {path}: {problem}; {action}")


def load_verified(path: Path, load: Callable[[Path], T], what: str = "file") -> Optional[T]:
    """``load(path)`` of a cached file that passes its check; None when the file is absent, or
    corrupt (one warning line; the file is deleted so that the caller rebuilds it). ``load``
    may also reject a file that loads but is not what the caller expects by raising."""
    path = Path(path)
    if not path.is_file():
        return None
    problem = check_file(path)
    if problem is None:
        try:
            return load(path)
        except Exception as exc:  # noqa: BLE001 -- a cache is ours to rebuild, whatever broke it
            problem = f"{exc.__class__.__name__}: {first_line(exc)}"
    report_corrupt(path, what, problem)
    remove(path)
    return None


def load_or_build(path: Path, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[T, Path], object],
                  what: str = "file") -> T:
    """The cached value at ``path`` when it is intact, else ``build()``, saved there."""
    value = load_verified(path, load, what)
    if value is None:
        value = build()
        save(value, path)
    return value


def verify_tree(root: Path) -> Iterator[tuple[Path, Optional[str]]]:
    """Every cached file under ``root`` with its problem (None when intact); a file without a
    sidecar yields ``"unchecked"``. Temporary files of writes in progress are skipped."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.endswith((SIDECAR_SUFFIX, ".tmp")) or path.name.startswith("."):
            continue
        if not has_sidecar(path):
            yield path, "unchecked"
        else:
            yield path, check_file(path)
