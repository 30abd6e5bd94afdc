"""Cascade folders: the on-disk format of a cascade, written atomically and read strictly.

Layout of a folder ``DIR``::

    DIR/cascade.json                CascadeConfig: the text encoder and every stage, lowest resolution first
    DIR/<stage>/config.json         StageConfig of that stage; must equal its entry in cascade.json
    DIR/<stage>/model.safetensors   U-Net state dict; its header metadata repeats the stage config
    DIR/text_encoder/               optional copy of the text encoder; cascade.json then sets
                                    text_encoder.name to "text_encoder", resolved relative to DIR

Weights are read with safetensors only, never with pickle. Reading is strict, and each of
these raises :class:`CascadeFolderError` naming the file and the key: a missing file, a
corrupt file, a missing or unexpected key, a shape mismatch, a non-finite value, or a config
whose U-Net, diffusion or resolution fields disagree with the weights.
Each file is written to a temporary name in the same folder and renamed into place, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import (
    CascadeConfig,
    ConfigError,
    PathLike,
    StageConfig,
    TextEncoderConfig,
    UNetConfig,
    load_json_config,
    save_json_config,
    to_dict,
    umask_file_mode,
)

CASCADE_FILE = "cascade.json"
STAGE_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
FORMAT_VERSION = "1"
_METADATA_CONFIG = "imagen.stage_config"
_METADATA_VERSION = "imagen.format_version"
# StageConfig fields that must match between config.json and the config stored with the weights.
_WEIGHT_DEFINING_KEYS = ("name", "resolution", "lowres_resolution", "unet", "diffusion")


class CascadeFolderError(ValueError):
    """Invalid cascade folder; the message names the file, the key and what to do."""


class CascadeFileNotFoundError(CascadeFolderError, FileNotFoundError):
    """A file or folder that a cascade folder needs does not exist."""


# --- paths ------------------------------------------------------------------------------------


def stage_config_path(folder: PathLike, stage_name: str) -> Path:
    return Path(folder) / stage_name / STAGE_CONFIG_FILE


def stage_weights_path(folder: PathLike, stage_name: str) -> Path:
    return Path(folder) / stage_name / WEIGHTS_FILE


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise CascadeFileNotFoundError(
            f"missing file {path} ({what}): a cascade folder needs {CASCADE_FILE} and, per stage, "
            f"<stage>/{STAGE_CONFIG_FILE} + <stage>/{WEIGHTS_FILE}; write it with "
            "ImagenPipeline.save_pretrained or imagen.cascade_folder.write_stage"
        )


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CascadeFileNotFoundError(
            f"cascade folder {str(folder)!r} not found: pass a folder written by ImagenPipeline.save_pretrained "
            f"(it contains {CASCADE_FILE})"
        )


# --- atomic writes ----------------------------------------------------------------------------


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_and_replace(temporary: Path, path: Path) -> None:
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(temporary, umask_file_mode())
    os.replace(temporary, path)


def _write_json_atomic(data: Any, path: Path) -> None:
    temporary = _temporary_path(path)
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        _fsync_and_replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def replace_folder(staged: Path, destination: Path) -> None:
    """Move the finished folder ``staged`` to ``destination`` and delete the folder it replaces.

    The old folder is renamed aside first and deleted last. ``destination`` is therefore missing
    only between two renames.
    """
    if not destination.exists():
        staged.rename(destination)
        return
    previous = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    destination.rename(previous)
    staged.rename(destination)
    shutil.rmtree(previous)


def _cpu_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU and make contiguous; clone tensors that share storage (safetensors rejects them)."""
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r}: expected str -> torch.Tensor, got {type(value).__name__}")
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storage and tensor.numel() > 0:
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    return tensors


def write_stage(folder: PathLike, stage_cfg: StageConfig, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write one stage as ``folder/<stage>/model.safetensors`` + ``config.json``; return the stage folder.

    ``state_dict`` must match the U-Net that ``stage_cfg.unet`` builds (same keys and shapes),
    or :class:`CascadeFolderError` is raised before anything is written. The weights are
    written first and the config second, each atomically. Both carry the stage config, so a
    crash between the two renames is detected by :func:`read_stage` as a disagreement.
    """
    if not isinstance(stage_cfg, StageConfig):
        raise TypeError(f"stage_cfg: expected a StageConfig, got {type(stage_cfg).__name__}")
    tensors = _cpu_tensors(state_dict)
    check_state_dict(tensors, stage_cfg.unet, source=f"state_dict for stage {stage_cfg.name!r}")

    stage_folder = Path(folder) / stage_cfg.name
    stage_folder.mkdir(parents=True, exist_ok=True)
    config_data = to_dict(stage_cfg)
    metadata = {
        "format": "pt",
        _METADATA_VERSION: FORMAT_VERSION,
        _METADATA_CONFIG: json.dumps(config_data, sort_keys=True),
    }

    weights_path = stage_folder / WEIGHTS_FILE
    temporary = _temporary_path(weights_path)
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        _fsync_and_replace(temporary, weights_path)
    finally:
        temporary.unlink(missing_ok=True)
    _write_json_atomic(config_data, stage_folder / STAGE_CONFIG_FILE)
    return stage_folder


def write_cascade_config(folder: PathLike, cfg: CascadeConfig) -> Path:
    """Write ``folder/cascade.json`` atomically; return its path."""
    if not isinstance(cfg, CascadeConfig):
        raise TypeError(f"cfg: expected a CascadeConfig, got {type(cfg).__name__}")
    path = Path(folder) / CASCADE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json_config(cfg, path)
    return path


# --- strict reads -----------------------------------------------------------------------------


def read_cascade(folder: PathLike) -> CascadeConfig:
    """Read and validate ``folder/cascade.json``."""
    folder = Path(folder)
    _require_folder(folder)
    path = folder / CASCADE_FILE
    _require_file(path, "the cascade config")
    return load_json_config(CascadeConfig, path)


def first_difference(expected: Any, actual: Any, prefix: str = "") -> Optional[tuple[str, Any, Any]]:
    """Return ``(dotted key, expected value, actual value)`` of the first difference of two JSON values, or None."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            if key not in expected or key not in actual:
                return (prefix + key, expected.get(key, "<missing>"), actual.get(key, "<missing>"))
            found = first_difference(expected[key], actual[key], f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for index, (left, right) in enumerate(zip(expected, actual)):
            found = first_difference(left, right, f"{prefix[:-1]}[{index}].")
            if found is not None:
                return found
        return None
    return None if expected == actual else (prefix[:-1], expected, actual)


def _open_weights_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CascadeFolderError(
            f"{path}: not a readable safetensors file ({error}); the file is corrupt or truncated: "
            "write the stage again (write_stage or save_pretrained)"
        ) from None


def read_weights_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Return the tensor shapes in a safetensors file from its header, without reading the tensors."""
    path = Path(path)
    _require_file(path, "stage weights")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CascadeFolderError(f"{path}: not a readable safetensors file ({error}); write the stage again") from None


def _check_embedded_config(path: Path, config_path: Path, stage_cfg: StageConfig, metadata: dict[str, str]) -> None:
    """Compare the weight-defining fields of config.json with the config stored in the weights' header."""
    if _METADATA_CONFIG not in metadata:
        return  # NOTE: weights written by other tools carry no config; only their keys and shapes are checked.
    try:
        embedded = json.loads(metadata[_METADATA_CONFIG])
    except json.JSONDecodeError as error:
        raise CascadeFolderError(f"{path}: header metadata '{_METADATA_CONFIG}' is not valid JSON ({error}); write the stage again") from None
    # Sampling defaults and training settings may be edited in config.json; the fields that
    # give the weights their meaning may not.
    keys = _WEIGHT_DEFINING_KEYS
    difference = first_difference({k: embedded.get(k, "<missing>") for k in keys}, {k: to_dict(stage_cfg)[k] for k in keys})
    if difference is not None:
        key, in_weights, in_config = difference
        raise CascadeFolderError(
            f"{config_path} disagrees with {path} at key '{key}': config.json has {in_config!r}, the weights were "
            f"saved with {in_weights!r}; the two files come from different saves: write the stage again"
        )


def expected_state_shapes(unet_cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Return the state-dict shapes of the U-Net ``unet_cfg`` builds (constructed on the meta device, no memory)."""
    from .unet import EfficientUNet

    with torch.device("meta"):
        model = EfficientUNet(unet_cfg)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_state_dict(state_dict: Mapping[str, Any], unet_cfg: UNetConfig, source: str) -> None:
    """Raise :class:`CascadeFolderError` unless ``state_dict`` has exactly the keys and shapes of the U-Net.

    ``state_dict`` values may be tensors or shape tuples. ``source`` (a file path) starts the message.
    """
    expected = expected_state_shapes(unet_cfg)
    actual = {key: tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value) for key, value in state_dict.items()}
    missing = [key for key in expected if key not in actual]
    if missing:
        raise CascadeFolderError(
            f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all) that the U-Net config needs; "
            "the weights belong to a different config or the file is incomplete: write the stage again"
        )
    unexpected = [key for key in actual if key not in expected]
    if unexpected:
        raise CascadeFolderError(
            f"{source}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected in all) that the U-Net config "
            "does not build; the weights belong to a different config: use the config they were saved with"
        )
    for key, shape in expected.items():
        if actual[key] != shape:
            raise CascadeFolderError(
                f"{source}: shape mismatch at key '{key}': the file has {list(actual[key])}, the U-Net config needs "
                f"{list(shape)}; the weights belong to a different config: use the config they were saved with"
            )


def _check_finite(tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CascadeFolderError(f"{source}: key '{key}' contains NaN or infinite values; use a checkpoint from before training diverged")


def read_stage(folder: PathLike, stage_name: str, device: Union[str, torch.device] = "cpu") -> tuple[StageConfig, dict[str, torch.Tensor]]:
    """Read one stage strictly and return ``(StageConfig, state_dict)``.

    Checks, in order: both files exist; config.json is a valid StageConfig named
    ``stage_name``; the safetensors header is readable and its stored config equals
    config.json; the keys and shapes equal those of the U-Net the config builds; every
    floating-point value is finite. Any failure raises :class:`CascadeFolderError`.
    """
    folder = Path(folder)
    _require_folder(folder)
    config_path = stage_config_path(folder, stage_name)
    weights_path = stage_weights_path(folder, stage_name)
    _require_file(config_path, f"config of stage {stage_name!r}")
    _require_file(weights_path, f"weights of stage {stage_name!r}")

    try:
        stage_cfg = load_json_config(StageConfig, config_path)
    except ConfigError as error:
        raise CascadeFolderError(str(error)) from None
    if stage_cfg.name != stage_name:
        raise CascadeFolderError(
            f"{config_path}: key 'name' is {stage_cfg.name!r} but the file sits in the folder of stage {stage_name!r}; "
            "rename the folder or fix the name"
        )

    _check_embedded_config(weights_path, config_path, stage_cfg, _open_weights_metadata(weights_path))
    check_state_dict(read_weights_shapes(weights_path), stage_cfg.unet, source=str(weights_path))
    try:
        state_dict = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CascadeFolderError(f"{weights_path}: reading the tensors failed ({error}); the file is corrupt: write the stage again") from None
    _check_finite(state_dict, weights_path)
    return stage_cfg, state_dict


def select_stages(cfg: CascadeConfig, last_stage: Union[int, str, None]) -> CascadeConfig:
    """Return ``cfg`` cut after ``last_stage`` (a stage name or 0-based index; None keeps every stage)."""
    if last_stage is None:
        return cfg
    names = [stage.name for stage in cfg.stages]
    if isinstance(last_stage, bool) or not isinstance(last_stage, (int, str)):
        raise TypeError(f"stage {last_stage!r}: expected a stage name or a 0-based index, one of {names}")
    if isinstance(last_stage, str):
        if last_stage not in names:
            raise ValueError(f"unknown stage {last_stage!r}: cascade {cfg.name!r} has stages {names}")
        index = names.index(last_stage)
    else:
        if not 0 <= last_stage < len(names):
            raise ValueError(f"stage index {last_stage} out of range: cascade {cfg.name!r} has stages 0..{len(names) - 1} ({names})")
        index = last_stage
    return dataclasses.replace(cfg, stages=cfg.stages[: index + 1])


def read_cascade_weights(
    folder: PathLike, last_stage: Union[int, str, None] = None, device: Union[str, torch.device] = "cpu"
) -> tuple[CascadeConfig, dict[str, dict[str, torch.Tensor]]]:
    """Read cascade.json and every stage up to ``last_stage``; validate them all before returning.

    Each stage's config.json must equal its entry in cascade.json. Returns the (possibly cut)
    cascade config and ``{stage name: state_dict}``.
    """
    folder = Path(folder)
    cfg = select_stages(read_cascade(folder), last_stage)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for index, stage in enumerate(cfg.stages):
        if index > 0 and not (folder / stage.name).exists():
            previous = cfg.stages[index - 1].name
            raise CascadeFileNotFoundError(
                f"missing folder {folder / stage.name}: {CASCADE_FILE} lists stage {stage.name!r} but the folder has no "
                f"files for it (not trained or exported yet?); load the stages before it with "
                f"stop_at_stage={previous!r} (imagen generate --stop-at-stage {previous})"
            )
        stage_cfg, state_dict = read_stage(folder, stage.name, device=device)
        difference = first_difference(to_dict(stage), to_dict(stage_cfg))
        if difference is not None:
            key, in_cascade, in_stage = difference
            raise CascadeFolderError(
                f"{stage_config_path(folder, stage.name)} disagrees with {folder / CASCADE_FILE} at key "
                f"'stages[{index}].{key}': the stage file has {in_stage!r}, cascade.json has {in_cascade!r}; "
                "write the cascade again with save_pretrained"
            )
        weights[stage.name] = state_dict
    return cfg, weights


def resolve_text_encoder(folder: PathLike, cfg: TextEncoderConfig) -> TextEncoderConfig:
    """Return ``cfg`` with a copied encoder (name "text_encoder") replaced by the absolute folder path."""
    if cfg.name != TEXT_ENCODER_DIR:
        return cfg
    path = Path(folder).resolve() / TEXT_ENCODER_DIR
    if not path.is_dir():
        raise CascadeFileNotFoundError(
            f"missing folder {path}: {CASCADE_FILE} key 'text_encoder.name' is {TEXT_ENCODER_DIR!r}, which means a copy "
            "of the encoder inside the cascade folder; copy it there or set the name to a hub id or folder"
        )
    return dataclasses.replace(cfg, name=str(path))


def stage_names_on_disk(folder: PathLike) -> list[str]:
    """Return the names of the sub-folders of ``folder`` that contain a stage weights file."""
    folder = Path(folder)
    return sorted(child.name for child in folder.iterdir() if (child / WEIGHTS_FILE).is_file()) if folder.is_dir() else []


__all__ = [
    "CascadeFolderError",
    "CascadeFileNotFoundError",
    "write_stage",
    "write_cascade_config",
    "read_cascade",
    "read_stage",
    "read_cascade_weights",
    "read_weights_shapes",
    "check_state_dict",
    "expected_state_shapes",
    "select_stages",
    "resolve_text_encoder",
    "stage_names_on_disk",
    "first_difference",
]
