"""ImagenPipeline: the whole cascade, from prompts to images in one call.

The text encoder encodes the prompts once. The base stage samples at its resolution
from text alone. Each super-resolution stage upsamples the previous output with
:func:`imagen.images.resize`, noise-augments it with :func:`imagen.diffusion.noise_augment`
at the stage's level, and samples at its own resolution conditioned on the text, the augmented
image and the level. Every stage samples through :func:`imagen.sampler.sample` with
classifier-free guidance from :func:`imagen.sampler.guided_model_fn`.

Seeds: image ``i`` of a call (prompt-major order: prompt ``p``, copy ``k`` is image
``p * num_images_per_prompt + k``) draws all its noise, in every stage, from its own
``torch.Generator`` seeded ``seed + i``. An image therefore depends on its seed and prompt,
not on its batch-mates or its position in the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .cascade_folder import (
    TEXT_ENCODER_DIR,
    read_cascade_weights,
    replace_folder,
    resolve_text_encoder,
    select_stages,
    write_cascade_config,
    write_stage,
)
from .config import CascadeConfig, PathLike, StageConfig, load_cascade_config
from .diffusion import noise_augment, randn_like_per_sample
from .images import resize
from .pipeline_inputs import (
    StageSettings,
    check_guidance_scale,
    check_negative_prompts,
    check_noise_aug_level,
    check_num_steps,
    check_output_type,
    check_positive_int,
    check_prompts,
    check_sampler,
    check_thresholding,
    convert_output,
    image_to_tensor,
    make_generators,
    per_stage,
    stage_sizes,
)
from .sampler import guided_model_fn, sample
from .text_encoder import FrozenTextEncoder, null_text_condition, pad_text, resolve_encoder_source

logger = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device, None]


@dataclass
class StepEnd:
    """Progress report passed to ``callback_on_step_end`` after each model evaluation of a stage."""

    stage_index: int
    stage_name: str
    step: int  # 0-based index of the evaluation within the stage
    num_steps: int
    log_snr: float
    x_t: torch.Tensor  # (B, 3, H, W) sample the model was evaluated at
    x0: torch.Tensor  # (B, 3, H, W) thresholded clean-image prediction


@dataclass
class TextCondition:
    """Per-image text conditions: ``embeds`` (B, L, D) float32 and ``mask`` (B, L) bool.

    ``negative_embeds`` and ``negative_mask`` feed the unconditional branch of classifier-free
    guidance; when None, that branch gets the null condition (zeros, all-False mask).
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    negative_embeds: Optional[torch.Tensor] = None
    negative_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def repeat(self, count: int) -> "TextCondition":
        """Repeat each row ``count`` times in place order (row r becomes rows r*count .. r*count + count - 1)."""
        fields = (self.embeds, self.mask, self.negative_embeds, self.negative_mask)
        return TextCondition(*[None if t is None else t.repeat_interleave(count, dim=0) for t in fields])



@dataclass
class ImagenPipelineOutput:
    """Result of a pipeline call.

    ``images``: the last stage's output as a list of PIL images ("pil"), a uint8 array
    (B, H, W, 3) ("np") or a float tensor (B, 3, H, W) in [-1, 1] on the CPU ("pt").
    ``stage_images``: stage name to that stage's output in the same type; every stage that
    ran with ``return_all_stages=True``, else only the last one.
    ``seeds``: the seed of each image, or None when generators were passed.
    ``settings``: the resolved settings of each stage that ran.
    """

    images: Any
    stage_images: dict[str, Any]
    seeds: Optional[list[int]]
    settings: list[StageSettings] = field(default_factory=list)


def _build_unet(stage: StageConfig, state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """Build the U-Net of ``stage``; load ``state_dict`` strictly when given (checked beforehand)."""
    from .unet import EfficientUNet

    if state_dict is None:
        return EfficientUNet(stage.unet)
    with torch.device("meta"):
        model = EfficientUNet(stage.unet)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # A non-persistent buffer is not in the state dict, so it stayed on the meta device.
        model = EfficientUNet(stage.unet)
        model.load_state_dict(state_dict, strict=True)
    return model


class ImagenPipeline:
    """A text encoder and one U-Net per stage of a :class:`~imagen.config.CascadeConfig`.

    Build one with :meth:`from_pretrained` (a cascade folder) or :meth:`from_config` (fresh
    random weights), then call it with prompts. ``unets`` maps stage names to modules, or lists
    them in stage order.
    """

    def __init__(
        self,
        config: CascadeConfig,
        text_encoder: FrozenTextEncoder,
        unets: Union[Mapping[str, nn.Module], Sequence[nn.Module]],
    ) -> None:
        if not isinstance(config, CascadeConfig):
            raise TypeError(f"config: expected a CascadeConfig, got {type(config).__name__}")
        names = [stage.name for stage in config.stages]
        if not isinstance(unets, Mapping):
            unets = list(unets)
            if len(unets) != len(names):
                raise ValueError(f"got {len(unets)} U-Nets for the {len(names)} stages {names}: pass one per stage")
            unets = dict(zip(names, unets))
        if sorted(unets) != sorted(names):
            raise ValueError(f"U-Nets are given for stages {sorted(unets)} but the cascade has stages {names}")
        if text_encoder.dim != config.text_encoder.dim:
            raise ValueError(
                f"text encoder {text_encoder.name!r} has width {text_encoder.dim}, the cascade expects "
                f"text_encoder.dim {config.text_encoder.dim}: pass the encoder the cascade was trained with"
            )
        self.config = config
        self.text_encoder = text_encoder
        self.unets: dict[str, nn.Module] = {name: unets[name].eval().requires_grad_(False) for name in names}
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.progress = True  # tqdm bars (stderr) over each stage's steps
        self._offload = False
        # Folder of the text encoder copy this pipeline was loaded from, when cascade.json names one.
        self._text_encoder_copy: Optional[Path] = None

    # --- construction and saving ----------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        cascade: Union[CascadeConfig, PathLike],
        *,
        seed: int = 0,
        stop_at_stage: Union[int, str, None] = None,
        text_encoder: Optional[FrozenTextEncoder] = None,
        device: DeviceLike = None,
        dtype: torch.dtype = torch.float32,
    ) -> "ImagenPipeline":
        """Build a cascade with freshly initialised U-Nets (stage k initialised from seed ``seed + k``).

        ``cascade`` is a CascadeConfig, a shipped config name such as "imagen-tiny", or a JSON
        file. Only the stages up to ``stop_at_stage`` (a name or 0-based index) are built.
        ``text_encoder`` reuses an encoder already loaded for ``cascade.text_encoder``.
        """
        cfg = cascade if isinstance(cascade, CascadeConfig) else load_cascade_config(cascade)
        cfg = select_stages(cfg, stop_at_stage)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"invalid seed {seed!r}: expected an integer")
        unets = {}
        for index, stage in enumerate(cfg.stages):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + index)
                unets[stage.name] = _build_unet(stage)
        if text_encoder is None:
            text_encoder = FrozenTextEncoder.from_config(cfg.text_encoder)
        return cls(cfg, text_encoder, unets).to(device, dtype)

    @classmethod
    def from_pretrained(
        cls,
        folder: PathLike,
        *,
        stop_at_stage: Union[int, str, None] = None,
        text_encoder: Optional[FrozenTextEncoder] = None,
        device: DeviceLike = None,
        dtype: torch.dtype = torch.float32,
    ) -> "ImagenPipeline":
        """Load a cascade folder (see :mod:`imagen.cascade_folder`) strictly, safetensors only.

        Every stage up to ``stop_at_stage`` (a name or 0-based index; None loads all) is read and
        validated before any U-Net is built, so a bad file fails the whole load with an error
        naming the file and the key. ``text_encoder`` reuses an encoder already loaded.
        """
        folder = Path(folder)
        cfg, weights = read_cascade_weights(folder, stop_at_stage)
        if text_encoder is None:
            text_encoder = FrozenTextEncoder.from_config(resolve_text_encoder(folder, cfg.text_encoder))
        unets = {stage.name: _build_unet(stage, weights.pop(stage.name)) for stage in cfg.stages}
        pipeline = cls(cfg, text_encoder, unets)
        if cfg.text_encoder.name == TEXT_ENCODER_DIR:
            pipeline._text_encoder_copy = folder.resolve() / TEXT_ENCODER_DIR
        logger.info("loaded cascade %r from %s: stages %s", cfg.name, folder, [s.name for s in cfg.stages])
        return pipeline.to(device, dtype)

    def save_pretrained(self, folder: PathLike, *, copy_text_encoder: Optional[bool] = None) -> Path:
        """Write the cascade folder: every stage, then cascade.json; return the folder.

        ``copy_text_encoder``: True copies the encoder into ``folder/text_encoder``; False
        stores a reference to it (its name in the config); None copies only when this pipeline
        was itself loaded from a copy.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        encoder_cfg = self.config.text_encoder
        copy = self._text_encoder_copy is not None if copy_text_encoder is None else bool(copy_text_encoder)
        if copy:
            self._copy_text_encoder(folder / TEXT_ENCODER_DIR)
            encoder_cfg = dataclasses.replace(encoder_cfg, name=TEXT_ENCODER_DIR)
        elif self._text_encoder_copy is not None:
            encoder_cfg = dataclasses.replace(encoder_cfg, name=str(self._text_encoder_copy))
        for stage in self.config.stages:
            write_stage(folder, stage, self.unets[stage.name].state_dict())
        write_cascade_config(folder, dataclasses.replace(self.config, text_encoder=encoder_cfg))
        logger.info("saved cascade %r to %s", self.config.name, folder)
        return folder

    def _copy_text_encoder(self, destination: Path) -> None:
        """Copy the encoder's checkpoint folder (or save the loaded model) to ``destination``, atomically."""
        if self._text_encoder_copy is not None:
            source, is_local = str(self._text_encoder_copy), True
        else:
            source, is_local = resolve_encoder_source(self.config.text_encoder.name)
        if is_local and destination.exists() and Path(source).resolve() == destination.resolve():
            return
        temporary = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        if is_local:
            shutil.copytree(source, temporary, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            self.text_encoder.save_pretrained(temporary)
        replace_folder(temporary, destination)

    # --- devices --------------------------------------------------------------------------

    def to(self, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> "ImagenPipeline":
        """Set the device that sampling runs on and the U-Nets' dtype; return self.

        The text encoder keeps the dtype of its config. With stage offload on, the modules stay
        on the CPU and only the active one visits ``device``.
        """
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise TypeError(f"invalid dtype {dtype!r}: pass a floating torch dtype such as torch.float32")
            self.dtype = dtype
        home = torch.device("cpu") if self._offload else self.device
        for unet in self.unets.values():
            unet.to(device=home, dtype=self.dtype)
        self.text_encoder.to(home)
        return self

    def enable_stage_offload(self, device: DeviceLike = None) -> "ImagenPipeline":
        """Keep every module on the CPU and move only the active one (encoder or a U-Net) to ``device``."""
        self._offload = True
        return self.to(device)

    def disable_stage_offload(self) -> "ImagenPipeline":
        self._offload = False
        return self.to()

    @contextlib.contextmanager
    def _active(self, module: Any) -> Iterator[None]:
        """Put ``module`` on the sampling device for the duration of the block when offloading."""
        if not self._offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # --- text -----------------------------------------------------------------------------

    def _encode_each(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each distinct prompt alone, so no embedding depends on its batch-mates; pad to max_length."""
        encoded = {}
        with self._active(self.text_encoder):
            for prompt in dict.fromkeys(prompts):
                embeds, mask = self.text_encoder.encode([prompt])
                encoded[prompt] = (embeds.cpu(), mask.cpu())
        length = max([self.config.text_encoder.max_length] + [mask.shape[1] for _, mask in encoded.values()])
        padded = [pad_text(*encoded[prompt], length) for prompt in prompts]
        return torch.cat([embeds for embeds, _ in padded]), torch.cat([mask for _, mask in padded])

    def encode_prompt(
        self, prompt: Union[str, Sequence[str]], negative_prompt: Union[str, Sequence[str], None] = None
    ) -> TextCondition:
        """Encode prompts (and negative prompts) into a :class:`TextCondition`, one row per prompt."""
        prompts = check_prompts(prompt)
        negatives = check_negative_prompts(negative_prompt, len(prompts))
        embeds, mask = self._encode_each(prompts)
        if negatives is None:
            return TextCondition(embeds, mask)
        return TextCondition(embeds, mask, *self._encode_each(negatives))

    def _check_embeds(self, key: str, embeds: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.config.text_encoder.dim
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != dim:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"invalid {key} {shape}: expected a float tensor (B, L, {dim}) from encode_prompt")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != embeds.shape[:2]:
            raise ValueError(f"invalid {key}_mask: expected a bool tensor of shape {tuple(embeds.shape[:2])} (True on real tokens)")
        return embeds.detach().float().cpu(), mask.cpu()

    def _text_condition(
        self, prompt: Any, negative_prompt: Any, prompt_embeds: Any, prompt_embeds_mask: Any,
        negative_prompt_embeds: Any, negative_prompt_embeds_mask: Any,
    ) -> TextCondition:
        """Return the text condition from prompts or from given embeddings, one row per prompt."""
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("no prompt given: pass prompt (a string or a list of strings) or prompt_embeds")
            if negative_prompt_embeds is not None:
                raise ValueError("negative_prompt_embeds needs prompt_embeds: pass negative_prompt with prompt instead")
            return self.encode_prompt(prompt, negative_prompt)
        if prompt is not None:
            raise ValueError("got both prompt and prompt_embeds: pass only one of them")
        embeds, mask = self._check_embeds("prompt_embeds", prompt_embeds, prompt_embeds_mask)
        if negative_prompt is not None:
            negatives = check_negative_prompts(negative_prompt, embeds.shape[0])
            return TextCondition(embeds, mask, *self._encode_each(negatives))
        if negative_prompt_embeds is None:
            return TextCondition(embeds, mask)
        negative, negative_mask = self._check_embeds("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_mask)
        if negative.shape[0] != embeds.shape[0]:
            raise ValueError(f"negative_prompt_embeds has batch {negative.shape[0]}, prompt_embeds {embeds.shape[0]}: pass one per prompt")
        return TextCondition(embeds, mask, negative, negative_mask)

    # --- one stage ------------------------------------------------------------------------

    def sample_stage(
        self,
        index: int,
        text: TextCondition,
        settings: StageSettings,
        generators: Optional[list[torch.Generator]],
        lowres: Optional[torch.Tensor] = None,
        *,
        eta: float = 0.0,
        callback_on_step_end: Optional[Callable[[StepEnd], Any]] = None,
        progress: Optional[bool] = None,
    ) -> torch.Tensor:
        """Sample stage ``index`` for every row of ``text``; return (B, 3, H, W) float32 in [-1, 1] on ``self.device``.

        A super-resolution stage needs ``lowres`` (B, 3, h, w): it is upsampled to the stage's
        size, noise-augmented at ``settings.noise_aug_level`` with noise from ``generators``,
        and given to the U-Net with that level.
        """
        stage = self.config.stages[index]
        unet = self.unets[stage.name]
        batch, device, dtype = len(text), self.device, self.dtype
        size = (settings.height, settings.width)

        embeds, mask = text.embeds.to(device, dtype), text.mask.to(device)
        if text.negative_embeds is None:
            negative, negative_mask = null_text_condition(batch, embeds.shape[1], embeds.shape[2], device, dtype)
        else:
            negative, negative_mask = text.negative_embeds.to(device, dtype), text.negative_mask.to(device)
        cond = {"text_embeds": embeds, "text_mask": mask, "lowres_image": None, "lowres_noise_level": None}
        uncond = {"text_embeds": negative, "text_mask": negative_mask, "lowres_image": None, "lowres_noise_level": None}

        if stage.is_super_resolution:
            if lowres is None or lowres.shape[0] != batch:
                raise ValueError(f"stage {stage.name!r} is a super-resolution stage: pass lowres (B={batch}, 3, h, w)")
            upsampled = resize(lowres.to(device, torch.float32), size)
            level = torch.full((batch,), settings.noise_aug_level, device=device, dtype=torch.float32)
            eps = randn_like_per_sample(upsampled.shape, generators, device, torch.float32)
            augmented = noise_augment(upsampled, level, stage.diffusion, eps).to(dtype)
            for branch in (cond, uncond):
                branch["lowres_image"], branch["lowres_noise_level"] = augmented, level

        def on_step(step: int, log_snr: float, x_t: torch.Tensor, x0: torch.Tensor) -> None:
            if callback_on_step_end is not None:
                callback_on_step_end(StepEnd(index, stage.name, step, settings.num_steps, log_snr, x_t, x0))

        logger.info("stage %s: %dx%d, %s, %d steps, guidance %g, noise augmentation %s", stage.name, size[0], size[1],
                    settings.sampler, settings.num_steps, settings.guidance_scale, settings.noise_aug_level)
        model_fn = guided_model_fn(unet, cond, uncond, settings.guidance_scale)
        with self._active(unet), torch.inference_mode():
            images = sample(
                model_fn, (batch, 3, *size), diffusion=stage.diffusion, solver=settings.sampler,
                num_steps=settings.num_steps, eta=eta, thresholding=settings.thresholding, generators=generators,
                device=device, dtype=dtype, callback=on_step, progress=self.progress if progress is None else progress,
            )
        return images.float().clamp(-1.0, 1.0)

    # --- the cascade ----------------------------------------------------------------------

    def _stage_index(self, stage: Union[int, str, None]) -> int:
        return len(select_stages(self.config, stage).stages) - 1

    def _resolve_settings(
        self, start: int, last: int, sizes: list[tuple[int, int]], guidance_scale: Any, num_inference_steps: Any,
        sampler: Any, noise_aug_level: Any, thresholding: Any,
    ) -> list[StageSettings]:
        cascade = list(self.config.stages)
        run = cascade[start:last + 1]
        guidance = per_stage(guidance_scale, "guidance_scale", run, cascade, lambda s: s.guidance_scale, check_guidance_scale)
        steps = per_stage(num_inference_steps, "num_inference_steps", run, cascade, lambda s: s.num_steps, check_num_steps)
        samplers = per_stage(sampler, "sampler", run, cascade, lambda s: s.sampler, check_sampler)
        modes = per_stage(thresholding, "thresholding", run, cascade, lambda s: s.thresholding, check_thresholding)
        super_resolution = [stage for stage in run if stage.is_super_resolution]
        levels = dict(zip(
            [stage.name for stage in super_resolution],
            per_stage(noise_aug_level, "noise_aug_level", super_resolution, [s for s in cascade if s.is_super_resolution],
                      lambda s: s.sample_noise_aug_level, check_noise_aug_level),
        ))
        return [
            StageSettings(stage.name, *sizes[start + i], guidance[i], steps[i], samplers[i], levels.get(stage.name), modes[i])
            for i, stage in enumerate(run)
        ]

    def plan(
        self,
        *,
        stop_at_stage: Union[int, str, None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        guidance_scale: Any = None,
        num_inference_steps: Any = None,
        sampler: Any = None,
        noise_aug_level: Any = None,
        thresholding: Any = None,
    ) -> list[StageSettings]:
        """Check the arguments of :meth:`__call__` and return the settings of each stage it would run.

        With these, :meth:`encode_prompt` and :meth:`sample_stage` run the cascade one stage at
        a time (as the cascade benchmark does).
        """
        last = self._stage_index(stop_at_stage)
        base = self.config.stages[0]
        height = base.resolution if height is None else height
        width = base.resolution if width is None else width
        sizes = stage_sizes(self.config.stages[:last + 1], height, width, base.resolution)
        return self._resolve_settings(0, last, sizes, guidance_scale, num_inference_steps, sampler,
                                      noise_aug_level, thresholding)

    def _run(
        self, text: TextCondition, start: int, settings: list[StageSettings], generators: list[torch.Generator],
        seeds: Optional[list[int]], lowres: Optional[torch.Tensor], output_type: str, return_all_stages: bool,
        eta: float, callback_on_step_end: Any, progress: Optional[bool],
    ) -> ImagenPipelineOutput:
        outputs: dict[str, Any] = {}
        images = lowres
        for offset, stage_settings in enumerate(settings):
            index = start + offset
            images = self.sample_stage(index, text, stage_settings, generators, images, eta=eta,
                                       callback_on_step_end=callback_on_step_end, progress=progress)
            if return_all_stages or offset == len(settings) - 1:
                outputs[stage_settings.name] = convert_output(images, output_type)
        return ImagenPipelineOutput(outputs[settings[-1].name], outputs, seeds, settings)

    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        *,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_images_per_prompt: int = 1,
        guidance_scale: Any = None,
        num_inference_steps: Any = None,
        sampler: Any = None,
        noise_aug_level: Any = None,
        thresholding: Any = None,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        seed: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        output_type: str = "pil",
        stop_at_stage: Union[int, str, None] = None,
        return_all_stages: bool = False,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_embeds_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds_mask: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        callback_on_step_end: Optional[Callable[[StepEnd], Any]] = None,
        progress: Optional[bool] = None,
    ) -> ImagenPipelineOutput:
        """Generate images from prompts through the stages up to ``stop_at_stage``.

        Per-stage settings (``guidance_scale``, ``num_inference_steps``, ``sampler``,
        ``thresholding``) take one value, a list with one value per stage, or a dict keyed by
        stage name. None uses each StageConfig's value.
        ``noise_aug_level`` in [0, 1] works the same way over the super-resolution stages only.

        ``height`` x ``width`` is the base stage's output size (default: its resolution), and
        stage k scales it by ``resolution_k / resolution_base``. Multiples of the base
        resolution always work. Sizes other than the trained one are outside what the stages
        saw in training.

        Seeds: pass ``seed`` (image i uses ``seed + i``), ``generator`` (one CPU
        torch.Generator per image), or neither (a seed is drawn from torch's global state and
        returned in ``.seeds``). ``prompt_embeds`` (B, L, D) and ``prompt_embeds_mask`` (B, L)
        from :meth:`encode_prompt` replace ``prompt``. ``callback_on_step_end`` receives a
        :class:`StepEnd` after every model evaluation.
        """
        output_type = check_output_type(output_type)
        count = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        settings = self.plan(
            stop_at_stage=stop_at_stage, height=height, width=width, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, sampler=sampler, noise_aug_level=noise_aug_level,
            thresholding=thresholding,
        )
        text = self._text_condition(prompt, negative_prompt, prompt_embeds, prompt_embeds_mask,
                                    negative_prompt_embeds, negative_prompt_embeds_mask).repeat(count)
        generators, seeds = make_generators(len(text), generator, seed)
        return self._run(text, 0, settings, generators, seeds, None, output_type, return_all_stages, eta,
                         callback_on_step_end, progress)

    def _start_stage(self, size: tuple[int, int], start_stage: Union[int, str, None]) -> int:
        """Return ``start_stage``'s index, or that of the stage whose input resolution is the shorter side of ``size``."""
        stages = self.config.stages
        if start_stage is not None:
            index = self._stage_index(start_stage)
            if not stages[index].is_super_resolution:
                raise ValueError(f"start_stage {start_stage!r} is the base stage: pass a super-resolution stage")
            return index
        matches = [i for i, stage in enumerate(stages) if stage.is_super_resolution and stage.lowres_resolution == min(size)]
        if not matches:
            accepted = {stage.name: stage.lowres_resolution for stage in stages if stage.is_super_resolution}
            raise ValueError(
                f"image size {size[0]}x{size[1]} matches no super-resolution stage: the shorter side must equal a "
                f"stage's input resolution {accepted}; resize the image, or pass start_stage"
            )
        return matches[0]

    def super_resolve(
        self,
        image: Any,
        prompt: Union[str, Sequence[str], None] = None,
        *,
        start_stage: Union[int, str, None] = None,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_images_per_prompt: int = 1,
        guidance_scale: Any = None,
        num_inference_steps: Any = None,
        sampler: Any = None,
        noise_aug_level: Any = None,
        thresholding: Any = None,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        seed: Optional[int] = None,
        output_type: str = "pil",
        stop_at_stage: Union[int, str, None] = None,
        return_all_stages: bool = False,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_embeds_mask: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        callback_on_step_end: Optional[Callable[[StepEnd], Any]] = None,
        progress: Optional[bool] = None,
    ) -> ImagenPipelineOutput:
        """Run the cascade from a given low-resolution image instead of the base stage.

        ``image``: a PIL image or list, a numpy array (H, W, 3) or (B, H, W, 3) (uint8, or float
        in [0, 1]), or a tensor (3, H, W) or (B, 3, H, W) in [-1, 1]. The first stage is
        ``start_stage``, by default the one whose ``lowres_resolution`` equals the image's shorter
        side (a 64 x 128 image starts at the 64 -> 256 stage and comes out 256 x 512).
        One image or one prompt is broadcast to the other's count. Other arguments are those of
        :meth:`__call__`.
        """
        output_type = check_output_type(output_type)
        count = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        lowres = image_to_tensor(image)
        height, width = lowres.shape[-2:]
        start = self._start_stage((height, width), start_stage)
        last = self._stage_index(stop_at_stage)
        if last < start:
            raise ValueError(f"stop_at_stage {stop_at_stage!r} comes before the start stage {self.config.stages[start].name!r}")
        stages = self.config.stages[start:last + 1]
        sizes = [None] * start + stage_sizes(stages, height, width, stages[0].lowres_resolution, key="image size")
        settings = self._resolve_settings(start, last, sizes, guidance_scale, num_inference_steps, sampler,
                                          noise_aug_level, thresholding)
        text = self._text_condition(prompt, negative_prompt, prompt_embeds, prompt_embeds_mask, None, None)

        if len(text) != lowres.shape[0]:
            if len(text) == 1:
                text = text.repeat(lowres.shape[0])
            elif lowres.shape[0] == 1:
                lowres = lowres.expand(len(text), -1, -1, -1)
            else:
                raise ValueError(f"got {lowres.shape[0]} images for {len(text)} prompts: pass one image or prompt, or as many of each")
        text = text.repeat(count)
        lowres = lowres.repeat_interleave(count, dim=0)
        generators, seeds = make_generators(len(text), generator, seed)
        return self._run(text, start, settings, generators, seeds, lowres, output_type, return_all_stages, eta,
                         callback_on_step_end, progress)

    def __repr__(self) -> str:
        stages = ", ".join(f"{s.name}={s.resolution}px" for s in self.config.stages)
        return f"ImagenPipeline({self.config.name!r}, {stages}, device={self.device}, dtype={self.dtype}, offload={self._offload})"
