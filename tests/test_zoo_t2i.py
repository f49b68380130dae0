"""zoo:digits-t2i, the committed StableDiffusionPipeline folder: diffusers loads it unchanged and offline,
its tokenizer reads every prompt word as one token, and its samples are the prompted digits."""
import json

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.zoo import ZOO, pipeline_folder, training_info
from compress.zoo.t2i import (
    DIGIT_WORDS,
    EOS,
    MAX_LENGTH,
    PROMPT_TEMPLATES,
    VOCABULARY_WORDS,
    all_prompts,
    bpe,
    build_vocabulary,
    digit_prompts,
    prompt,
)

LONG_PROMPT = " ".join(["a handwritten seven"] * 40)  # 120 words: truncated to 77 ids


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_folder("digits-t2i")), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(pipeline_folder("digits-t2i") / "tokenizer"), local_files_only=True)


def pipeline_digits(images: np.ndarray) -> torch.Tensor:
    """The pipeline's [0, 1] RGB numpy output as the judge's [-1, 1] 1-channel images."""
    return torch.from_numpy(images).mean(-1)[:, None] * 2 - 1


def test_folder_is_a_standard_pipeline():
    folder = pipeline_folder("digits-t2i")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for part in ("unet", "vae", "text_encoder"):
        assert list((folder / part).glob("*.safetensors")) and not list((folder / part).glob("*.bin"))
    assert ZOO["digits-t2i"].kind == "pipeline"
    assert training_info("digits-t2i")["phases"][0]["phase"] == "vae"


def test_pipeline_generates_16x16_from_a_prompt(pipe):
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 4
    out = pipe(["a handwritten seven", "the digit 3"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    images = out.images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1


def test_every_prompt_word_is_one_token(clip_tokenizer):
    vocab, merges = build_vocabulary()
    ranks = {pair: i for i, pair in enumerate(merges)}
    assert clip_tokenizer.model_max_length == MAX_LENGTH and clip_tokenizer.pad_token == EOS
    for word in VOCABULARY_WORDS + tuple("0123456789"):
        ids = clip_tokenizer(word).input_ids
        assert ids == [clip_tokenizer.bos_token_id, vocab[word + "</w>"], clip_tokenizer.eos_token_id], word
        assert bpe(word, ranks) == [word + "</w>"]  # the reference BPE agrees with transformers
    # Words outside the vocabulary still tokenize, into byte-level characters.
    assert clip_tokenizer.convert_ids_to_tokens(clip_tokenizer("xyz").input_ids[1:-1]) == ["x", "y", "z</w>"]


def test_prompts_cycle_digits_and_templates():
    prompts, labels = digit_prompts(25)
    assert labels.tolist() == [i % 10 for i in range(25)]
    assert prompts[0] == prompt(0, 0) and prompts[13] == prompt(3, 1) and prompt(7, 4) == "seven"
    assert len(set(all_prompts())) == 1 + 10 * len(PROMPT_TEMPLATES)
    assert all(DIGIT_WORDS[d] in p or str(d) in p for p, d in zip(prompts, labels.tolist()))


def test_tokenizer_json_loads_without_transformers_and_agrees(clip_tokenizer):
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(pipeline_folder("digits-t2i") / "tokenizer" / "tokenizer.json"))
    for text in all_prompts() + [LONG_PROMPT, "A  Handwritten SEVEN!", "xyzzy 42"]:
        expected = clip_tokenizer(text, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
        encoding = fast.encode(text)  # the json itself pads to 77 with EOS and truncates, as the pipeline does
        assert encoding.ids == expected and len(expected) == MAX_LENGTH, text
        fast.no_padding()
        assert fast.encode(text).ids == clip_tokenizer(text, truncation=True).input_ids, text
        fast.enable_padding(length=MAX_LENGTH, pad_id=clip_tokenizer.pad_token_id, pad_token=EOS)


def test_pipeline_folder_errors(tmp_path, monkeypatch):
    import compress.zoo as zoo

    with pytest.raises(UserError, match="not a pipeline"):
        pipeline_folder("digits")
    with pytest.raises(UserError, match="not a diffusion model"):
        zoo.load_denoiser("digits-t2i")
    monkeypatch.setattr(zoo, "CHECKPOINTS", tmp_path)
    with pytest.raises(UserError, match="compress zoo train digits-t2i"):
        pipeline_folder("digits-t2i")


@pytest.mark.slow
def test_ddim50_guided_samples_are_the_prompted_digits(pipe):
    from diffusers import DDIMScheduler

    from compress.metrics import DigitsJudge

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts, labels = digit_prompts(256)
    images = pipe(prompts, num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert DigitsJudge().agreement(pipeline_digits(images), labels) >= 0.9
