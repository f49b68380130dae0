"""Helpers for the tests that break one part of a pipeline folder and expect one line and exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from compress.cli import main


def copy_folder(folders: dict, name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folders[name], target)
    return target


def replace_model(folder: Path, component: str, model) -> None:
    shutil.rmtree(folder / component)
    model.save_pretrained(str(folder / component))


def edit_index(folder: Path, remove: tuple[str, ...] = (), **entries) -> None:
    """Sets ``entries`` in the folder's model_index.json and removes the keys in ``remove``."""
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(entries)
    for key in remove:
        del index[key]
    path.write_text(json.dumps(index))


def export_fails_with(capsys, folder: Path, out: Path, expected: str, options: tuple[str, ...] = ()) -> None:
    capsys.readouterr()  # what building the bad folder printed (save_pretrained's progress bars)
    code = main(["export", f"diffusers:{folder}", "--solver", "model", "--steps", "2", "--out", str(out), *options])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()
