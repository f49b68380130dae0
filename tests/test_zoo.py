"""The committed zoo checkpoints: they load without pickles and make digits a person recognizes."""
import pytest
import torch

from compress.loading import load_model
from compress.metrics import DigitsJudge
from compress.sampling import make_noise, sample
from compress.solvers import SolverConfig
from compress.zoo import ZOO, checkpoint_path, load_classifier
from compress.zoo.data import load_digits_tensors
from tests.conftest import assert_one_line_error


def test_zoo_list_names_the_three_models(cli):
    result = cli("zoo", "list")
    assert result.returncode == 0
    for name in ("zoo:digits ", "zoo:digits-cond ", "zoo:digits-classifier "):
        assert name in result.stdout
    assert "not trained" not in result.stdout


def test_checkpoints_are_safetensors_of_a_few_mb():
    from compress.zoo import pipeline_folder

    for name, entry in ZOO.items():
        if entry.kind == "pipeline":  # a diffusers folder: every weight file is safetensors, no pickle anywhere
            files = [p for p in pipeline_folder(name).rglob("*") if p.is_file()]
            assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
            weights = [p for p in files if p.suffix == ".safetensors"]
            assert len(weights) >= 3 and sum(p.stat().st_size for p in weights) < 24e6
            continue
        path = checkpoint_path(name)
        assert path.suffix == ".safetensors" and path.stat().st_size < 8e6


def test_classifier_reads_held_out_digits():
    images, labels = load_digits_tensors("heldout")
    accuracy = (load_classifier()(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.97


def test_descriptions():
    d = load_model("zoo:digits")
    assert (d.prediction_type, d.sample_shape, d.conditioning, d.schedule.num_train_timesteps) == ("epsilon", (1, 16, 16), "none", 1000)
    c = load_model("zoo:digits-cond")
    assert c.conditioning == "class" and c.num_classes == 10 and c.supports_guidance


@pytest.mark.slow
def test_ddim100_samples_are_confident_digits():
    digits = load_model("zoo:digits")
    samples = sample(digits, SolverConfig("ddim", 100), make_noise(digits, 256, seed=0), show_progress=False)
    judge = DigitsJudge()
    assert judge.confident_share(samples) >= 0.9
    held_out, _ = load_digits_tensors("heldout")
    train, _ = load_digits_tensors("train")
    assert judge.fd(samples, held_out) < 3 * judge.fd(train, held_out) + 5


@pytest.mark.slow
def test_guided_conditional_samples_are_the_asked_class():
    cond = load_model("zoo:digits-cond")
    labels = torch.arange(200) % 10
    samples = sample(cond, SolverConfig("ddim", 50, guidance_scale=3.0), make_noise(cond, 200, seed=1), labels, show_progress=False)
    assert DigitsJudge().agreement(samples, labels) >= 0.9


def test_same_seed_same_picture(tmp_path, cli):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        assert cli("sample", "zoo:digits", "--steps", "10", "--n", "8", "--seed", "3", "--out", p).returncode == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_label_on_unconditional_model_exits_2(tmp_path, cli):
    assert_one_line_error(cli("sample", "zoo:digits", "--label", "3", "--out", tmp_path / "g.png"), "class-conditional")
    assert_one_line_error(cli("sample", "zoo:digits-cond", "--label", "12", "--steps", "2", "--out", tmp_path / "g.png"), "out of range")


def test_every_zoo_model_names_its_data_and_a_pruned_copy_keeps_it(tmp_path):
    """Validation picks the digits judge and prompts from ``extra["data"]``, not from a "zoo:" reference."""
    from compress.loading import load_pipeline
    from compress.prune import PruneConfig, prune, save_pruned

    assert load_pipeline("zoo:digits-t2i").denoiser.extra["data"] == "digits"
    digits = load_model("zoo:digits")
    assert digits.extra["data"] == "digits" and load_model("zoo:digits-cond").extra["data"] == "digits"
    save_pruned(prune(digits, PruneConfig(method="magnitude", ratio=0.25, finetune_steps=0)), tmp_path / "pruned")
    reloaded = load_model(str(tmp_path / "pruned"))
    assert reloaded.source == str(tmp_path / "pruned") and reloaded.extra["data"] == "digits"
