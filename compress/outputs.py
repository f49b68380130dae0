"""The output-folder contract: written to a temporary folder, renamed into place at the end.

The one place for staged writes and file hashing: `staged_folder` (a whole output folder),
`staged_files` (files that land together in a folder that may hold others), `staged_file` (one
file), and `sha256_of` / `files_sha256` (one file, or several under their names).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from compress.errors import UserError

MANIFEST = "manifest.json"


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    _update_with_file(digest, path)
    return digest.hexdigest()


def files_sha256(files: Iterable[tuple[str, Path]]) -> str:
    """One digest over several files: each one's name (as given), a NUL byte and its bytes, in the order given."""
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0")
        _update_with_file(digest, path)
    return digest.hexdigest()


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False):
    """Yields a temporary sibling of ``out``; on success it replaces ``out``, on any failure it is removed."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not force:
        raise UserError(f"--out {out} is a non-empty folder that is not a compress output; pick another or pass --force")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        staging.mkdir()
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = out.parent / f".{out.name}.previous-{os.getpid()}"
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_files(out_dir: str | Path, prefix: str = ".staging-"):
    """Yields a hidden folder inside ``out_dir``; on success everything in it is renamed into ``out_dir``
    (replacing files or folders of the same names), on any failure it is removed and ``out_dir`` is as before."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers_of_dead_processes(out_dir, prefix)
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out_dir))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            destination = out_dir / item.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(item, destination)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: str | Path):
    """Yields a temporary name beside ``path``; on success it is renamed to ``path``, on any failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers_of_dead_processes(path.parent, f".{path.name}.", ".partial")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def writable_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` with its folder made, or a UserError naming it: checked before the long work, not after."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise PermissionError(13, "Permission denied")
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder")
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {e.strerror or e}") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """A run killed outright (SIGKILL, power loss) cannot clean up after itself; the next one does."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _remove_leftovers_of_dead_processes(folder: Path, prefix: str, suffix: str = "") -> None:
    """The staged writes ``PREFIX<pid>...SUFFIX`` in ``folder`` of processes that no longer exist (killed
    outright); those of live processes, and names without a process id, are left alone."""
    for leftover in folder.glob(f"{glob.escape(prefix)}*{suffix}"):
        digits = re.match(r"\d+", leftover.name[len(prefix):])
        if digits and int(digits.group()) != os.getpid() and not _pid_alive(int(digits.group())):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


class Manifest:
    """manifest.json: every artifact with its format, stage, sha256, size and the recipe section that made it."""

    def __init__(self, root: Path, recipe_name: str = ""):
        self.root = root
        self.recipe_name = recipe_name
        self.artifacts: list[dict] = []

    def add(self, path: Path, format: str, stage: str, section: dict | None = None, **extra) -> dict:
        path = Path(path)
        entry = {
            "path": str(path.relative_to(self.root)),
            "format": format,
            "stage": stage,
            "sha256": sha256_of(path),
            "bytes": path.stat().st_size,
            "recipe": section,
            **extra,
        }
        self.artifacts.append(entry)
        return entry

    def write(self, **header) -> Path:
        return write_json(self.root / MANIFEST, {"recipe": self.recipe_name, **header, "artifacts": self.artifacts})


def verify_manifest(root: Path) -> None:
    """Every file the manifest lists is present with its recorded sha256; the first that is not is named."""
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} has no {MANIFEST}; is it a 'compress run' output folder?")
    try:
        entries = json.loads(path.read_text())["artifacts"]
        listed = [(e["path"], e["sha256"]) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt: {e}") from None
    for relative, digest in listed:
        file = root / relative
        if not file.is_file():
            raise UserError(f"{file} is listed in {MANIFEST} but missing")
        if sha256_of(file) != digest:
            raise UserError(f"{file} is corrupt: its sha256 differs from the one in {MANIFEST}")
