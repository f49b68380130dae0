"""compress.outputs: the one helper for staged writes and file hashing, and the writers that use it."""
import hashlib

import pytest

from compress.outputs import files_sha256, sha256_of, staged_file, staged_files


def test_staged_files_land_together_and_replace_files_and_folders_of_the_same_name(tmp_path):
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "old.json").write_text("old")
    (out / "keep.txt").write_text("keep")
    (out / "a.onnx").write_text("old")
    with staged_files(out, ".test-") as stage:
        assert stage.parent == out and stage.name.startswith(".test-")
        (stage / "a.onnx").write_text("new")
        (stage / "tokenizer").mkdir()
        (stage / "tokenizer" / "vocab.json").write_text("{}")
    assert (out / "a.onnx").read_text() == "new" and (out / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["vocab.json"]
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "keep.txt", "tokenizer"]


def test_a_failed_staged_write_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.onnx").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_files(out) as stage:
            (stage / "a.onnx").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["a.onnx"] and (out / "a.onnx").read_text() == "old"
    target = tmp_path / "calib.safetensors"
    with pytest.raises(RuntimeError):
        with staged_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == [out]
    with staged_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("whole")
    assert target.read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors", "out"]


def test_file_digests_keep_their_formats(tmp_path):
    a, b = tmp_path / "a.xml", tmp_path / "sub" / "a.bin"
    b.parent.mkdir()
    a.write_bytes(b"x" * 3_000_000)  # over one read block
    b.write_bytes(b"weights")
    assert sha256_of(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    expected = hashlib.sha256(b"a.xml\0" + a.read_bytes() + b"sub/a.bin\0" + b.read_bytes()).hexdigest()
    assert files_sha256([("a.xml", a), ("sub/a.bin", b)]) == expected
    from export.openvino_export import files_sha256 as ir_sha256

    assert ir_sha256([a, b]) == hashlib.sha256(b"a.xml\0" + a.read_bytes() + b"a.bin\0" + b.read_bytes()).hexdigest()
    from export.coreml_export import package_sha256

    assert package_sha256(tmp_path) == expected


def test_writers_stage_through_the_one_helper():
    """No writer keeps its own temporary-name-and-rename code: they all go through compress.outputs."""
    import inspect

    import calibration.storage
    import compress.quantize
    import export.coreml_export
    import export.onnx_export
    import export.openvino_export

    for module in (calibration.storage, compress.quantize, export.coreml_export, export.onnx_export, export.openvino_export):
        source = inspect.getsource(module)
        assert "os.replace(" not in source and "tempfile.mkdtemp(" not in source and "tempfile.mkstemp(" not in source, module.__name__
        assert ".read(1 << 20)" not in source, module.__name__  # a file read block by block into a digest


def test_a_later_staged_write_removes_the_leftovers_of_dead_processes_only(tmp_path):
    """A process killed outright (SIGKILL) leaves its staged files; the next write there removes them."""
    import os

    dead, live = 999999999, os.getppid()  # no such process; the process that started this one
    out = tmp_path / "export"
    (out / f".onnx-export-{dead}-x1y2").mkdir(parents=True)
    (out / f".onnx-export-{dead}-x1y2" / "sampler.onnx").write_text("half")
    (out / f".onnx-export-{live}-a3b4").mkdir()
    (tmp_path / f".calib.safetensors.{dead}.q9.partial").write_text("half")
    (tmp_path / f".calib.safetensors.{live}.r8.partial").write_text("in use")
    with staged_files(out, ".onnx-export-") as stage:
        (stage / "sampler.onnx").write_text("whole")
    assert sorted(p.name for p in out.iterdir()) == [f".onnx-export-{live}-a3b4", "sampler.onnx"]
    with staged_file(tmp_path / "calib.safetensors") as tmp:
        assert str(os.getpid()) in tmp.name
        tmp.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".calib.safetensors.{live}.r8.partial", "calib.safetensors", "export"]
