"""`compress run --resume`: reuse a stage's files from the previous output folder when nothing it
depends on has changed.

Each stage has a key: the sha256 of everything that decides its output (the recipe sections it
reads, the hash of the weights it starts from, the keys of the stages before it, the toolkit's
version). The manifest records, per stage, its key and its files with their sha256. On resume a
stage whose key matches and whose files are all present and intact is copied into the new
(staged) folder instead of being run again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from compress.outputs import MANIFEST, sha256_of


def toolkit_version() -> str:
    try:
        return version("diffusion-compress")
    except PackageNotFoundError:
        return "unknown"


def stage_key(**inputs) -> str:
    text = json.dumps({"toolkit": toolkit_version(), **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class StageCache:
    def __init__(self, root: Path, previous: Path | None = None, log=lambda m: None):
        self.root = root
        self.previous = previous
        self.log = log
        self.stages: dict[str, dict] = {}
        self._old: dict[str, dict] = {}
        if previous is not None and (previous / MANIFEST).is_file():
            try:
                self._old = json.loads((previous / MANIFEST).read_text()).get("stages") or {}
            except (OSError, json.JSONDecodeError):
                self._old = {}

    def reuse(self, name: str, key: str) -> bool:
        """Copies the stage's files from the previous folder when its key matches and every file is intact."""
        old = self._old.get(name)
        if not old or old.get("key") != key:
            return False
        files = old.get("files") or {}
        if not all((self.previous / p).is_file() and sha256_of(self.previous / p) == digest for p, digest in files.items()):
            return False
        for relative in files:
            target = self.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.previous / relative, target)
        self.stages[name] = old
        self.log(f"{name}: unchanged, reused from the previous run")
        return True

    def done(self, name: str, key: str, paths: list[Path]) -> None:
        files = {}
        for path in paths:
            items = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
            files.update({str(p.relative_to(self.root)): sha256_of(p) for p in items})
        self.stages[name] = {"key": key, "files": files}
