"""Tests for the cascade configuration: shipped files round-trip, and every invalid file names its fault.

Each error case edits one copy of the shipped ``imagen-tiny`` cascade: a base stage at 64 px with
3 U-Net levels, then sr256 with 4 levels and sr1024 with 5. The test checks that the message names
the file, the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from imagen.config import (
    CONFIG_DIR,
    CascadeConfig,
    ConfigError,
    StageConfig,
    from_dict,
    load_cascade_config,
    load_json_config,
    save_cascade_config,
    save_json_config,
    to_dict,
)

SHIPPED = ["imagen-tiny", "imagen-small", "imagen-paper"]
DELETE = object()  # marks a key to remove in `edit`


def tiny_data() -> dict:
    return json.loads((CONFIG_DIR / "imagen-tiny.json").read_text(encoding="utf-8"))


def edit(data: dict, path: str, value) -> dict:
    """Return a copy of ``data`` with the dotted ``path`` (``stages.1.unet.head_dim``) set to ``value``."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        last = int(last)
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def write_json(folder: Path, data) -> Path:
    path = folder / "cascade.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def load_error(folder: Path, data) -> tuple[Path, str]:
    path = write_json(folder, data)
    with pytest.raises(ConfigError) as error:
        load_cascade_config(path)
    return path, str(error.value)


# --- shipped files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cascade_round_trip(name, tmp_path):
    config = load_cascade_config(name)
    path = tmp_path / f"{name}.json"

    save_cascade_config(config, path)
    reloaded = load_cascade_config(path)

    assert reloaded == config
    assert isinstance(reloaded.stages, tuple)
    assert list(tmp_path.glob("*.tmp")) == []


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_matches_to_dict(name):
    config = load_cascade_config(name)
    data = json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))

    assert to_dict(config) == data


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cascade_is_consistent(name):
    config = load_cascade_config(name)

    assert config.name == name
    assert not config.stages[0].is_super_resolution
    for low, high in zip(config.stages, config.stages[1:]):
        assert high.lowres_resolution == low.resolution
    assert config.stage(config.stages[-1].name) is config.stages[-1]


def test_stage_lookup_names_stages():
    config = load_cascade_config("imagen-tiny")

    with pytest.raises(KeyError, match=r"'sr512'.*\['base', 'sr256', 'sr1024'\]"):
        config.stage("sr512")


def test_stage_config_file_round_trip(tmp_path):
    stage = load_cascade_config("imagen-tiny").stages[1]
    path = tmp_path / "sr256" / "config.json"

    save_json_config(stage, path)

    assert load_json_config(StageConfig, path) == stage


def test_from_dict_builds_equal_config():
    config = load_cascade_config("imagen-tiny")

    assert from_dict(CascadeConfig, to_dict(config)) == config


# --- invalid values --------------------------------------------------------------------------

# (dotted path to edit, new value, dotted key in the message, value as the message shows it, allowed values)
INVALID_VALUES = [
    ("text_encoder.name", "", "text_encoder.name", "''", "a non-empty folder, hub id or package: path"),
    ("text_encoder.kind", "bert", "text_encoder.kind", "'bert'", "one of 't5', 'auto'"),
    ("text_encoder.dtype", "float16", "text_encoder.dtype", "'float16'", "one of 'float32', 'bfloat16'"),
    ("text_encoder.dim", 0, "text_encoder.dim", "0", "an integer > 0"),
    ("text_encoder.max_length", -5, "text_encoder.max_length", "-5", "an integer > 0 (tokens)"),
    ("text_encoder.max_length", 64.5, "text_encoder.max_length", "64.5", "expected an integer"),
    ("stages.0.name", "2x", "stages[0].name", "'2x'", "a Python identifier"),
    ("stages.0.resolution", "64", "stages[0].resolution", "'64'", "expected an integer"),
    ("stages.0.resolution", True, "stages[0].resolution", "True", "expected an integer"),
    ("stages.0.resolution", 66, "stages[0].resolution", "66", "a multiple of the U-Net's downsampling factor 4"),
    ("stages.0.resolution", -64, "stages[0].resolution", "-64", "an integer > 0 (pixels)"),
    ("stages.0.num_steps", 0, "stages[0].num_steps", "0", "an integer >= 1"),
    ("stages.1.thresholding", "adaptive", "stages[1].thresholding", "'adaptive'", "one of 'dynamic', 'static', 'none'"),
    ("stages.0.sampler", "euler", "stages[0].sampler", "'euler'", "one of 'ddpm', 'ddim', 'dpmpp_2m'"),
    ("stages.0.guidance_scale", -1.0, "stages[0].guidance_scale", "-1.0", "a float >= 0 (1.0 = no guidance)"),
    ("stages.0.guidance_scale", "5", "stages[0].guidance_scale", "'5'", "expected a finite number"),
    ("stages.0.guidance_scale", float("inf"), "stages[0].guidance_scale", "inf", "expected a finite number"),
    ("stages.1.sample_noise_aug_level", 1.5, "stages[1].sample_noise_aug_level", "1.5", "a float in [0, 1]"),
    ("stages.1.train_noise_aug_max", -0.1, "stages[1].train_noise_aug_max", "-0.1", "a float in [0, 1]"),
    ("stages.0.train_crop", 30, "stages[0].train_crop", "30", "null or a multiple of 4 no larger than resolution=64"),
    ("stages.2.train_crop", 200, "stages[2].train_crop", "200", "null or a multiple of 16 no larger than resolution=1024"),
    ("stages.0.unet.base_channels", -8, "stages[0].unet.base_channels", "-8", "an integer > 0"),
    ("stages.0.unet.channel_mults", [], "stages[0].unet.channel_mults", "()", "at least one level"),
    ("stages.0.unet.channel_mults", [1, 0, 4], "stages[0].unet.channel_mults", "(1, 0, 4)", "integers > 0"),
    ("stages.0.unet.num_res_blocks", [1, 2], "stages[0].unet.num_res_blocks", "(1, 2)",
     "one entry per level (3, as channel_mults)"),
    ("stages.1.unet.cross_attention", [False, True], "stages[1].unet.cross_attention", "(False, True)",
     "one entry per level (4, as channel_mults)"),
    ("stages.0.unet.self_attention", [0, 1, 1], "stages[0].unet.self_attention[0]", "0", "expected true or false"),
    ("stages.0.unet.num_res_blocks", [1, 0, 2], "stages[0].unet.num_res_blocks", "(1, 0, 2)", "integers >= 1"),
    ("stages.0.unet.head_dim", 48, "stages[0].unet.head_dim", "48", "a divisor of the width of every level with attention"),
    ("stages.0.unet.dropout", 1.0, "stages[0].unet.dropout", "1.0", "a float in [0, 1)"),
    ("stages.0.unet.gradient_checkpointing", "yes", "stages[0].unet.gradient_checkpointing", "'yes'",
     "expected true or false"),
    ("stages.0.unet", 5, "stages[0].unet", "5", "expected an object with the fields of UNetConfig"),
    ("stages.0.diffusion.objective", "epsilon", "stages[0].diffusion.objective", "'epsilon'", "one of 'eps', 'x0', 'v'"),
    ("stages.0.diffusion.schedule", "sigmoid", "stages[0].diffusion.schedule", "'sigmoid'", "one of 'cosine', 'linear'"),
    ("stages.0.diffusion.log_snr_min", 30.0, "stages[0].diffusion.log_snr_min", "30.0", "a float < log_snr_max (20.0)"),
    ("stages.0.diffusion.min_snr_gamma", 0, "stages[0].diffusion.min_snr_gamma", "0.0", "null or a float > 0"),
    ("stages", "base", "stages", "'base'", "expected a list"),
    ("stages", [], "stages", "()", "a list of at least one stage"),
    # Super-resolution stage consistency.
    ("stages.1.lowres_resolution", 32, "stages[1].lowres_resolution", "32", "the previous stage's resolution (64)"),
    ("stages.1.lowres_resolution", 256, "stages[1].lowres_resolution", "256", "null or an integer in (0, resolution=256)"),
    ("stages.1.lowres_resolution", None, "stages[1].unet.lowres_cond", "True", "true exactly when lowres_resolution is set"),
    ("stages.0.unet.lowres_cond", True, "stages[0].unet.lowres_cond", "True", "true exactly when lowres_resolution is set"),
    ("stages.1.name", "base", "stages", "['base', 'base', 'sr1024']", "distinct stage names"),
    # Text embedding width must match the encoder.
    ("stages.1.unet.text_embed_dim", 512, "stages[1].unet.text_embed_dim", "512", "text_encoder.dim (384)"),
    ("text_encoder.dim", 512, "stages[0].unet.text_embed_dim", "384", "text_encoder.dim (512)"),
]


@pytest.mark.parametrize(("path", "value", "key", "shown", "allowed"), INVALID_VALUES,
                         ids=[f"{case[0]}={case[1]!r}" for case in INVALID_VALUES])
def test_invalid_value_message(tmp_path, path, value, key, shown, allowed):
    file, message = load_error(tmp_path, edit(tiny_data(), path, value))

    assert str(file) in message
    assert f"key '{key}'" in message
    assert f"invalid value {shown} " in message
    assert allowed in message


def test_super_resolution_first_stage_rejected(tmp_path):
    data = edit(tiny_data(), "stages.0.lowres_resolution", 32)
    data = edit(data, "stages.0.unet.lowres_cond", True)

    file, message = load_error(tmp_path, data)

    assert str(file) in message
    assert "key 'stages[0].lowres_resolution'" in message
    assert "invalid value 32 " in message
    assert "null: the first stage is the text-to-image base stage" in message


# --- unknown and missing keys ----------------------------------------------------------------

UNKNOWN_KEYS = [
    ("version", "version", "CascadeConfig takes ['name', 'text_encoder', 'stages']"),
    ("text_encoder.pooling", "text_encoder.pooling", "TextEncoderConfig takes ['name', 'kind', 'dim'"),
    ("stages.1.unet.attention_heads", "stages[1].unet.attention_heads", "UNetConfig takes ['in_channels'"),
    ("stages.2.diffusion.beta_start", "stages[2].diffusion.beta_start", "DiffusionConfig takes ['schedule'"),
]


@pytest.mark.parametrize(("path", "key", "allowed"), UNKNOWN_KEYS, ids=[case[0] for case in UNKNOWN_KEYS])
def test_unknown_key_message(tmp_path, path, key, allowed):
    file, message = load_error(tmp_path, edit(tiny_data(), path, 1))

    assert str(file) in message
    assert f"unknown key '{key}'" in message
    assert allowed in message


MISSING_KEYS = [
    ("stages", "stages", "CascadeConfig needs all of ['name', 'text_encoder', 'stages']"),
    ("text_encoder.max_length", "text_encoder.max_length", "TextEncoderConfig needs all of ['name', 'kind'"),
    ("stages.0.unet.head_dim", "stages[0].unet.head_dim", "UNetConfig needs all of ['in_channels'"),
    ("stages.2.diffusion.min_snr_gamma", "stages[2].diffusion.min_snr_gamma", "'log_snr_max', 'min_snr_gamma']"),
    ("stages.1.lowres_resolution", "stages[1].lowres_resolution", "StageConfig needs all of ['name', 'resolution'"),
]


@pytest.mark.parametrize(("path", "key", "allowed"), MISSING_KEYS, ids=[case[0] for case in MISSING_KEYS])
def test_missing_key_message(tmp_path, path, key, allowed):
    file, message = load_error(tmp_path, edit(tiny_data(), path, DELETE))

    assert str(file) in message
    assert f"missing key '{key}'" in message
    assert allowed in message


# --- malformed files -------------------------------------------------------------------------


def test_bad_json_message(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "imagen-tiny",}', encoding="utf-8")

    with pytest.raises(ConfigError) as error:
        load_cascade_config(path)

    assert str(path) in str(error.value)
    assert "not valid JSON" in str(error.value)
    assert "line 1" in str(error.value)


def test_non_object_json_message(tmp_path):
    path = write_json(tmp_path, [tiny_data()])

    with pytest.raises(ConfigError) as error:
        load_cascade_config(path)

    assert str(path) in str(error.value)
    assert "expected a JSON object with the fields of CascadeConfig, got list" in str(error.value)


def test_unknown_cascade_name_lists_shipped():
    with pytest.raises(FileNotFoundError) as error:
        load_cascade_config("imagen-huge")

    assert "'imagen-huge'" in str(error.value)
    for name in SHIPPED:
        assert name in str(error.value)


def test_from_dict_names_default_source():
    with pytest.raises(ConfigError, match=r"^<dict>: unknown key 'extra'"):
        from_dict(CascadeConfig, {**tiny_data(), "extra": 1})


def test_saved_config_has_umask_mode(tmp_path):
    import stat

    from imagen.config import save_cascade_config, umask_file_mode

    path = tmp_path / "cascade.json"
    save_cascade_config(load_cascade_config("imagen-tiny"), path)
    assert stat.S_IMODE(path.stat().st_mode) == umask_file_mode()
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was left behind"
