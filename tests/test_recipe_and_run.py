"""Recipe schema, `compress run` output-folder contract, `compress report` gates."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from compress.errors import UserError
from compress.recipe import parse_recipe
from tests.conftest import assert_one_line_error

TINY = {
    "name": "tiny",
    "model": "python:tests.tiny_models:tiny_denoiser",
    "solver": {"name": "ddim", "steps": 4},
    "validate": {"reference": {"name": "ddim", "steps": 10}, "samples": 4},
}


def write_recipe(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"model": "zoo:digits", "solvr": {}}, "unknown key 'solvr'; did you mean 'solver'?"),
        ({"model": "zoo:digits", "solver": {"step": 3}}, "unknown key 'solver.step'; did you mean 'steps'?"),
        ({"model": "zoo:digits", "validate": {"referense": {}}}, "did you mean 'reference'"),
        ({"model": "zoo:digits", "solver": {"steps": 0}}, "solver.steps"),
        ({"solver": {}}, "model: Field required"),
        ([1, 2], "YAML mapping"),
        ({"model": {"ref": "zoo:digits", "prediction_type": "epsilom"}}, "model.prediction_type: expected one of 'epsilon'"),
        ({"model": {"ref": "zoo:digits", "prediction_type": "epsilom"}}, "did you mean 'epsilon'"),
        ({"model": "zoo:digits", "export": {"formats": ["onnx", "onx"]}}, "export.formats[1]"),
        ({"model": "zoo:digits", "validate": {"samples": "many"}}, "validate.samples: expected an integer, got 'many'"),
        ({"model": "zoo:digits", "validate": {"reference": None}}, "validate.reference: expected a mapping"),
        ({"model": "zoo:digits", "seed": True}, "seed: expected an integer"),
    ],
)
def test_recipe_errors_name_the_key(data, fragment):
    with pytest.raises(UserError) as e:
        parse_recipe(data)
    assert fragment in str(e.value)


def test_recipe_sections_are_dataclass_configs_that_round_trip():
    from compress.section_config import SectionConfig

    recipe = parse_recipe({"name": "r", "model": "zoo:digits", "solver": {"steps": 4, "guidance_scale": 2},
                           "validate": {"reference": {"steps": 20}, "samples": 8}, "export": {"formats": ["onnx"]},
                           "quantize": {"scheme": "w8a8"}, "bench": {"runs": 3}})
    assert all(isinstance(getattr(recipe, name), SectionConfig) for name in ("model", "solver", "validate_", "export", "bench", "report"))
    assert recipe.solver.guidance_scale == 2.0 and isinstance(recipe.solver.guidance_scale, float)
    data = recipe.to_dict()
    assert data["validate"]["reference"]["steps"] == 20 and data["model"]["ref"] == "zoo:digits" and data["quantize"] == {"scheme": "w8a8"}
    assert parse_recipe(data) == recipe
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(data))) == recipe


def test_transform_sections_are_checked_by_the_same_checker():
    from compress.slim import SlimConfig

    assert SlimConfig.from_dict({"lr": "1e-3"}).lr == 1e-3  # YAML reads 1e-3 as a string
    with pytest.raises(UserError, match=r"slim\.wavelet_gating: expected true or false, got 'no'"):
        SlimConfig.from_dict({"wavelet_gating": "no"})
    with pytest.raises(UserError, match=r"unknown key 'slim\.widht'; did you mean 'width'"):
        SlimConfig.from_dict({"widht": 0.5})


def test_run_writes_the_output_contract(tmp_path, cli):
    out = tmp_path / "out"
    result = cli("run", write_recipe(tmp_path / "r.yaml", TINY), "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["artifacts"]:
        path = out / entry["path"]
        assert path.is_file() and path.stat().st_size == entry["bytes"]
        assert len(entry["sha256"]) == 64 and entry["stage"] and entry["format"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert [r["artifact"] for r in report["rows"]] == ["baseline", "float32/module"]
    assert report["rows"][0]["psnr"] == float("inf") and report["rows"][1]["psnr"] > 5
    assert report["environment"]["device"] == "cpu"
    assert list(report["stages"]) == ["baseline", "validate float32 on torch"]
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 100 for s in report["stages"].values())
    assert "| baseline |" in (out / "report" / "report.md").read_text()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_same_seed_same_artifacts(tmp_path, cli):
    recipe = write_recipe(tmp_path / "r.yaml", TINY)
    digests = []
    for name in ("a", "b"):
        assert cli("run", recipe, "--out", tmp_path / name).returncode == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        digests.append({e["path"]: e["sha256"] for e in manifest["artifacts"] if e["stage"] != "report"})
    assert digests[0] == digests[1]


def test_recipe_typo_exits_2_and_leaves_no_folder(tmp_path, cli):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "solver": {"nme": "ddim"}})
    result = cli("run", recipe, "--out", tmp_path / "out")
    assert_one_line_error(result, "did you mean 'name'")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_model_in_recipe_leaves_no_folder(tmp_path, cli):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "model": "zoo:nothing"})
    assert_one_line_error(cli("run", recipe, "--out", tmp_path / "out"), "unknown zoo model")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stopped_run_exits_with_the_signal_code_and_leaves_no_output_folder(sig, code, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "validate": {"reference": {"name": "ddim", "steps": 1000}, "samples": 64}})
    # A shell that runs the suite in the background starts its children with SIGINT ignored, and Python
    # keeps an ignored SIGINT: the child gets the default disposition, as from a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--out", str(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(tmp_path.glob(".out.partial-*")), "the run never started writing"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-1000:]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_later_run_removes_partial_folders_of_dead_processes(tmp_path, cli):
    stale = tmp_path / ".out.partial-999999999"
    (stale / "artifacts").mkdir(parents=True)
    assert cli("run", write_recipe(tmp_path / "r.yaml", TINY), "--out", tmp_path / "out").returncode == 0
    assert not stale.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where not even root can make a folder")
@pytest.mark.parametrize("command", [["export", "python:tests.tiny_models:tiny_denoiser", "--steps", "2"],
                                     ["sample", "python:tests.tiny_models:tiny_denoiser", "--steps", "2"]])
def test_an_unwritable_output_path_is_one_line_exit_2(command, cli):
    target = "/proc/nope/out" + (".png" if command[0] == "sample" else "")
    assert_one_line_error(cli(*command, "--out", target), f"cannot write --out {target}")


def test_report_checks_gate(tmp_path, cli):
    out = tmp_path / "out"
    assert cli("run", write_recipe(tmp_path / "r.yaml", {**TINY, "report": {"checks": ["psnr>=1"]}}), "--out", out).returncode == 0
    assert cli("report", out, "--check", "psnr>=1").returncode == 0
    failed = cli("report", out, "--check", "psnr>=1000")
    assert failed.returncode == 1 and "psnr>=1000" in failed.stderr
    assert_one_line_error(cli("report", out, "--check", "psnr=>3"), "malformed check")
    assert_one_line_error(cli("report", out, "--check", "fidelity>=3"), "no row reports metric 'fidelity'")
    (out / "report" / "report.json").write_text("{not json")
    assert_one_line_error(cli("report", out), "report.json is corrupt")
    assert_one_line_error(cli("report", tmp_path / "nowhere"), "no report/report.json")


def test_failed_recipe_check_exits_1(tmp_path, cli):
    result = cli("run", write_recipe(tmp_path / "r.yaml", {**TINY, "report": {"checks": ["psnr>=1000"]}}), "--out", tmp_path / "out")
    assert result.returncode == 1 and "psnr>=1000" in result.stderr
    assert (tmp_path / "out" / "report" / "report.json").is_file()
