"""ImagenPipeline and the cascade folder format, on a tiny three-stage cascade (16 -> 32 -> 64 px)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import imagen.pipeline as pipeline_module
from imagen.cascade_folder import (
    CascadeFileNotFoundError,
    CascadeFolderError,
    read_cascade,
    read_stage,
    write_stage,
)
from imagen.config import CascadeConfig, DiffusionConfig, StageConfig, UNetConfig, to_dict
from imagen.diffusion import alpha_sigma
from imagen.pipeline import ImagenPipeline, StepEnd
from imagen.text_encoder import FrozenTextEncoder

PROMPTS = ["a red fox jumps over a wooden fence", "two cats"]


def tiny_unet(text_dim: int, lowres: bool) -> UNetConfig:
    return UNetConfig(
        in_channels=3,
        out_channels=3,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=(1, 1),
        self_attention=(False, not lowres),  # SR stages: no self-attention at 16-32 px, which is slow on a CPU
        cross_attention=(False, True),
        head_dim=16,
        cond_dim=32,
        text_embed_dim=text_dim,
        lowres_cond=lowres,
        dropout=0.0,
        gradient_checkpointing=False,
    )


def tiny_stage(name: str, resolution: int, lowres: int | None, text_dim: int, steps: int) -> StageConfig:
    return StageConfig(
        name=name,
        resolution=resolution,
        lowres_resolution=lowres,
        train_crop=None,
        train_noise_aug_max=0.0 if lowres is None else 0.5,
        sample_noise_aug_level=0.0 if lowres is None else 0.1,
        guidance_scale=3.0 if lowres is None else 2.0,
        sampler="dpmpp_2m",
        num_steps=steps,
        thresholding="dynamic",
        unet=tiny_unet(text_dim, lowres is not None),
        diffusion=DiffusionConfig("cosine", "v", -20.0, 20.0, 5.0),
    )


@pytest.fixture(scope="module")
def tiny_cascade_config(tiny_text_encoder_config) -> CascadeConfig:
    dim = tiny_text_encoder_config.dim
    stages = (
        tiny_stage("base", 16, None, dim, steps=3),
        tiny_stage("sr32", 32, 16, dim, steps=2),
        tiny_stage("sr64", 64, 32, dim, steps=2),
    )
    return CascadeConfig(name="test-tiny", text_encoder=tiny_text_encoder_config, stages=stages)


@pytest.fixture(scope="module")
def encoder(tiny_text_encoder_config) -> FrozenTextEncoder:
    return FrozenTextEncoder.from_config(tiny_text_encoder_config)


@pytest.fixture(scope="module")
def pipe(tiny_cascade_config, encoder) -> ImagenPipeline:
    """The tiny cascade with every weight perturbed, as after training.

    A freshly initialised U-Net zero-initialises some output layers, which would make the
    text and the low-resolution image irrelevant and several tests vacuous.
    """
    pipeline = ImagenPipeline.from_config(tiny_cascade_config, seed=0, text_encoder=encoder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for unet in pipeline.unets.values():
            for parameter in unet.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    pipeline.progress = False
    return pipeline


@pytest.fixture(scope="module")
def saved_folder(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cascade")
    pipe.save_pretrained(folder, copy_text_encoder=True)
    return folder


@pytest.fixture()
def folder_copy(saved_folder, tmp_path) -> Path:
    """A private copy of the saved cascade that a test may damage."""
    target = tmp_path / "cascade"
    shutil.copytree(saved_folder, target)
    return target


def generate(pipeline: ImagenPipeline, prompt, **kwargs) -> torch.Tensor:
    return pipeline(prompt, output_type="pt", progress=False, **kwargs).images


# --- save and load ---------------------------------------------------------------------------


def test_folder_layout(saved_folder, tiny_cascade_config):
    assert (saved_folder / "cascade.json").is_file()
    for stage in tiny_cascade_config.stages:
        assert (saved_folder / stage.name / "config.json").is_file()
        assert (saved_folder / stage.name / "model.safetensors").is_file()
    assert (saved_folder / "text_encoder" / "config.json").is_file()
    assert read_cascade(saved_folder).text_encoder.name == "text_encoder"
    assert not list(saved_folder.rglob(".*tmp*"))


def test_save_load_generates_same_images(pipe, saved_folder):
    loaded = ImagenPipeline.from_pretrained(saved_folder)
    loaded.progress = False
    for stage in pipe.config.stages:
        original, reloaded = pipe.unets[stage.name].state_dict(), loaded.unets[stage.name].state_dict()
        assert original.keys() == reloaded.keys()
        assert all(torch.equal(original[key], reloaded[key]) for key in original)
    expected = generate(pipe, PROMPTS, seed=11)
    actual = generate(loaded, PROMPTS, seed=11)
    assert actual.shape == (2, 3, 64, 64)
    assert torch.equal(actual, expected)


def test_save_reference_keeps_encoder_name(pipe, tmp_path, tiny_text_encoder_config):
    pipe.save_pretrained(tmp_path, copy_text_encoder=False)
    assert read_cascade(tmp_path).text_encoder.name == tiny_text_encoder_config.name
    assert not (tmp_path / "text_encoder").exists()


def test_resave_loaded_pipeline_copies_encoder(saved_folder, encoder, tmp_path):
    loaded = ImagenPipeline.from_pretrained(saved_folder, text_encoder=encoder)
    loaded.save_pretrained(tmp_path / "again")
    assert read_cascade(tmp_path / "again").text_encoder.name == "text_encoder"
    assert (tmp_path / "again" / "text_encoder" / "config.json").is_file()


def test_from_pretrained_prefix_of_stages(folder_copy, encoder):
    shutil.rmtree(folder_copy / "sr64")
    with pytest.raises(CascadeFileNotFoundError, match="stage 'sr64' .* stop_at_stage='sr32'"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)
    loaded = ImagenPipeline.from_pretrained(folder_copy, stop_at_stage="sr32", text_encoder=encoder)
    assert [stage.name for stage in loaded.config.stages] == ["base", "sr32"]
    assert generate(loaded, "a fox", seed=0).shape == (1, 3, 32, 32)


# --- determinism and seeds ---------------------------------------------------------------


def test_image_independent_of_batch_mates(pipe):
    batch = generate(pipe, ["a small robot", PROMPTS[0], "the tall giraffe at night"], seed=20)
    alone = generate(pipe, PROMPTS[0], seed=21)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=0)


def test_seed_rule_per_image(pipe):
    copies = generate(pipe, "a red fox", num_images_per_prompt=3, seed=30)
    third = generate(pipe, "a red fox", seed=32)
    generators = [torch.Generator().manual_seed(30 + i) for i in range(3)]
    with_generators = generate(pipe, "a red fox", num_images_per_prompt=3, generator=generators)
    torch.testing.assert_close(copies[2:3], third, atol=1e-4, rtol=0)
    assert torch.equal(with_generators, copies)
    assert not torch.equal(copies[0], copies[1])


def test_returns_seeds_and_settings(pipe):
    output = pipe(PROMPTS, num_images_per_prompt=2, seed=5, output_type="pt", progress=False)
    assert output.seeds == [5, 6, 7, 8]
    assert [s.name for s in output.settings] == ["base", "sr32", "sr64"]
    assert [s.num_steps for s in output.settings] == [3, 2, 2]
    assert [s.noise_aug_level for s in output.settings] == [None, 0.1, 0.1]


def test_global_seed_makes_call_repeatable(pipe):
    torch.manual_seed(123)
    first = pipe("a fox", stop_at_stage="base", output_type="pt", progress=False)
    torch.manual_seed(123)
    second = pipe("a fox", stop_at_stage="base", output_type="pt", progress=False)
    assert first.seeds == second.seeds
    assert torch.equal(first.images, second.images)


# --- stages, sizes and outputs -----------------------------------------------------------


def test_stop_at_stage_never_runs_later_stage(pipe, monkeypatch):
    calls = {name: 0 for name in pipe.unets}
    for name, unet in pipe.unets.items():
        original = unet.forward

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(unet, "forward", counting)
    output = pipe("a fox", seed=0, stop_at_stage="sr32", output_type="pt", return_all_stages=True, progress=False)
    assert calls["base"] > 0
    assert calls["sr32"] > 0
    assert calls["sr64"] == 0
    assert set(output.stage_images) == {"base", "sr32"}
    assert output.images.shape == (1, 3, 32, 32)


def test_stop_at_stage_by_index_matches_name(pipe):
    by_index = generate(pipe, "a fox", seed=3, stop_at_stage=0)
    by_name = generate(pipe, "a fox", seed=3, stop_at_stage="base")
    assert torch.equal(by_index, by_name)


def test_non_square_sizes(pipe):
    output = pipe("a wide landscape", seed=1, height=16, width=48, return_all_stages=True, progress=False)
    sizes = {name: [image.size for image in images] for name, images in output.stage_images.items()}
    assert sizes == {"base": [(48, 16)], "sr32": [(96, 32)], "sr64": [(192, 64)]}
    tall = pipe("a tall tower", seed=1, height=32, width=16, output_type="np", progress=False)
    assert tall.images.shape == (1, 128, 64, 3)


def test_invalid_size_names_value(pipe):
    with pytest.raises(ValueError, match="height/width 15x16"):
        pipe("a fox", height=15, width=16)


def test_output_types(pipe):
    pil = pipe("a fox", seed=2, progress=False).images
    array = pipe("a fox", seed=2, output_type="np", progress=False).images
    tensor = pipe("a fox", seed=2, output_type="pt", progress=False).images
    assert isinstance(pil[0], Image.Image)
    assert pil[0].mode == "RGB"
    assert array.dtype == np.uint8
    assert array.shape == (1, 64, 64, 3)
    assert tensor.dtype == torch.float32
    assert tensor.min() >= -1
    assert tensor.max() <= 1
    assert np.array_equal(np.asarray(pil[0]), array[0])


def test_per_stage_steps_and_callback(pipe):
    events: list[StepEnd] = []
    pipe("a fox", seed=0, num_inference_steps=[2, 1, 3], guidance_scale={"sr64": 1.0},
         callback_on_step_end=events.append, progress=False)
    counts = {name: sum(event.stage_name == name for event in events) for name in pipe.unets}
    assert counts == {"base": 2, "sr32": 1, "sr64": 3}
    assert events[0].x0.shape == (1, 3, 16, 16)
    assert events[-1].x0.shape == (1, 3, 64, 64)


def test_prompt_embeds_reuse(pipe):
    text = pipe.encode_prompt(PROMPTS)
    from_embeds = generate(pipe, None, prompt_embeds=text.embeds, prompt_embeds_mask=text.mask, seed=4, stop_at_stage="sr32")
    from_prompts = generate(pipe, PROMPTS, seed=4, stop_at_stage="sr32")
    assert torch.equal(from_embeds, from_prompts)


def test_negative_prompt_changes_guided_output(pipe):
    plain = generate(pipe, "a fox", seed=6, stop_at_stage="base")
    negative = generate(pipe, "a fox", negative_prompt="blurry", seed=6, stop_at_stage="base")
    unguided = generate(pipe, "a fox", negative_prompt="blurry", seed=6, stop_at_stage="base", guidance_scale=1.0)
    unguided_plain = generate(pipe, "a fox", seed=6, stop_at_stage="base", guidance_scale=1.0)
    assert not torch.equal(plain, negative)
    assert torch.equal(unguided, unguided_plain)


def test_noise_aug_level_changes_super_resolution(pipe):
    low = generate(pipe, "a fox", seed=8, stop_at_stage="sr32", noise_aug_level=0.0)
    high = generate(pipe, "a fox", seed=8, stop_at_stage="sr32", noise_aug_level=[0.9])
    assert not torch.equal(low, high)


def test_super_resolve_starts_at_matching_stage(pipe):
    base = generate(pipe, "a fox", seed=9, stop_at_stage="base")
    full = generate(pipe, "a fox", seed=9, stop_at_stage="sr32")
    from_tensor = pipe.super_resolve(base, "a fox", generator=[torch.Generator().manual_seed(9)], output_type="pt",
                                     stop_at_stage="sr32", progress=False)
    assert from_tensor.images.shape == (1, 3, 32, 32)
    assert [s.name for s in from_tensor.settings] == ["sr32"]
    # The full run drew the base stage's noise from the same generator first, so the two differ.
    assert not torch.equal(from_tensor.images, full)

    pil = Image.new("RGB", (32, 32), (200, 30, 30))
    from_pil = pipe.super_resolve(pil, ["a red square", "a red wall"], seed=0, output_type="np", progress=False)
    assert from_pil.images.shape == (2, 64, 64, 3)
    assert [s.name for s in from_pil.settings] == ["sr64"]


class UpsampleOracle(torch.nn.Module):
    """Predicts the v that makes x0 exactly the conditioning image: a perfect super-resolution U-Net."""

    def forward(self, x, log_snr, text_embeds=None, text_mask=None, lowres_image=None, lowres_noise_level=None):
        alpha, sigma = (value.double()[:, None, None, None] for value in alpha_sigma(log_snr.double()))
        return ((alpha * x.double() - lowres_image.double()) / sigma).to(x.dtype)


def test_super_resolve_keeps_orientation(pipe, tiny_cascade_config, encoder):
    oracle = ImagenPipeline(tiny_cascade_config, encoder, [pipe.unets["base"], UpsampleOracle(), UpsampleOracle()])
    oracle.progress = False
    # A 16 x 32 (height x width) image: red left half, blue right half, a white top row.
    array = np.zeros((16, 32, 3), dtype=np.uint8)
    array[:, :16, 0] = 220
    array[:, 16:, 2] = 220
    array[0] = 255
    output = oracle.super_resolve(Image.fromarray(array), "a flag", seed=0, noise_aug_level=0.0, output_type="np",
                                  return_all_stages=True)
    assert output.stage_images["sr32"].shape == (1, 32, 64, 3)
    final = output.images[0].astype(int)
    assert final.shape == (64, 128, 3)
    assert final[32, 10, 0] > 200  # left half red
    assert final[32, 10, 2] < 30
    assert final[32, 118, 2] > 200  # right half blue
    assert final[32, 118, 0] < 30
    assert final[0, 64].min() > 200

    from_sr64 = oracle.super_resolve(Image.fromarray(array), "a flag", start_stage="sr64", seed=0, output_type="np")
    assert from_sr64.images.shape == (1, 32, 64, 3)


def test_plan_resolves_defaults(pipe):
    settings = pipe.plan(height=32, width=16, num_inference_steps={"sr32": 5}, stop_at_stage="sr32")
    assert [(s.name, s.height, s.width, s.num_steps) for s in settings] == [("base", 32, 16, 3), ("sr32", 64, 32, 5)]
    assert [s.guidance_scale for s in settings] == [3.0, 2.0]


def test_super_resolve_rejects_unmatched_size(pipe):
    with pytest.raises(ValueError, match="image size 24x24 matches no super-resolution stage: the shorter side"):
        pipe.super_resolve(torch.zeros(1, 3, 24, 24), "a fox")


def test_stage_offload_gives_same_images(pipe):
    expected = generate(pipe, "a fox", seed=12, stop_at_stage="sr32")
    try:
        pipe.enable_stage_offload("cpu")
        actual = generate(pipe, "a fox", seed=12, stop_at_stage="sr32")
    finally:
        pipe.disable_stage_offload()
    assert torch.equal(actual, expected)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": []}, ValueError, "prompt is an empty list"),
        ({"prompt": ["a fox", 3]}, TypeError, r"prompt\[1\] is int 3"),
        ({"prompt": 7}, TypeError, "invalid prompt 7"),
        ({"prompt": "a fox", "guidance_scale": -1.0}, ValueError, "invalid guidance_scale -1.0"),
        ({"prompt": "a fox", "num_inference_steps": 0}, ValueError, "invalid num_inference_steps 0"),
        ({"prompt": "a fox", "num_inference_steps": [2, 2]}, ValueError, "got 2 values for num_inference_steps"),
        ({"prompt": "a fox", "sampler": "euler"}, ValueError, "invalid sampler 'euler'"),
        ({"prompt": "a fox", "noise_aug_level": 1.5}, ValueError, "invalid noise_aug_level 1.5"),
        ({"prompt": "a fox", "guidance_scale": {"sr128": 2.0}}, ValueError, "unknown stage 'sr128'"),
        ({"prompt": "a fox", "stop_at_stage": "sr128"}, ValueError, "unknown stage 'sr128'"),
        ({"prompt": "a fox", "output_type": "jpeg"}, ValueError, "invalid output_type 'jpeg'"),
        ({"prompt": "a fox", "num_images_per_prompt": 0}, ValueError, "invalid num_images_per_prompt 0"),
        ({"prompt": "a fox", "seed": -1}, ValueError, "invalid seed -1"),
        ({"prompt": ["a", "b"], "generator": [torch.Generator()]}, ValueError, "got 1 generators for 2 images"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, ValueError, "got 3 negative prompts for 2 prompts"),
        ({"prompt": None}, ValueError, "no prompt given"),
    ],
)
def test_bad_call_arguments(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(progress=False, **kwargs)


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-cascade"
    with pytest.raises(FileNotFoundError, match="no-such-cascade"):
        ImagenPipeline.from_pretrained(missing)


def test_missing_cascade_json(folder_copy, encoder):
    (folder_copy / "cascade.json").unlink()
    with pytest.raises(CascadeFileNotFoundError, match=r"missing file .*cascade\.json"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def test_corrupt_weights_file(folder_copy, encoder):
    weights = folder_copy / "sr32" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CascadeFolderError, match=r"sr32/model\.safetensors: not a readable safetensors file"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def _rewrite_weights(path: Path, change) -> None:
    """Load a weights file, apply ``change`` to its tensors, and save it back with the same metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_shape_mismatch_names_key(folder_copy, encoder):
    weights = folder_copy / "sr64" / "model.safetensors"
    key = sorted(load_file(str(weights)))[0]

    def widen(tensors):
        tensors[key] = torch.cat([tensors[key], tensors[key]])

    _rewrite_weights(weights, widen)
    with pytest.raises(CascadeFolderError, match=rf"shape mismatch at key '{key}'"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def test_missing_key_names_key(folder_copy, encoder):
    weights = folder_copy / "base" / "model.safetensors"
    key = sorted(load_file(str(weights)))[-1]
    _rewrite_weights(weights, lambda tensors: tensors.pop(key))
    with pytest.raises(CascadeFolderError, match=rf"base/model\.safetensors: missing key '{key}'"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def test_unexpected_key_names_key(folder_copy, encoder):
    weights = folder_copy / "base" / "model.safetensors"
    _rewrite_weights(weights, lambda tensors: tensors.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(CascadeFolderError, match="unexpected key 'extra.weight'"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def test_non_finite_weights_rejected(folder_copy, encoder):
    weights = folder_copy / "base" / "model.safetensors"
    key = sorted(load_file(str(weights)))[0]

    def poison(tensors):
        tensors[key].view(-1)[0] = float("nan")

    _rewrite_weights(weights, poison)
    with pytest.raises(CascadeFolderError, match=f"key '{key}' contains NaN"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def test_config_disagreeing_with_weights(folder_copy, encoder):
    config_path = folder_copy / "sr32" / "config.json"
    data = json.loads(config_path.read_text())
    data["unet"]["cond_dim"] = 48
    config_path.write_text(json.dumps(data))
    with pytest.raises(CascadeFolderError, match=r"sr32/config\.json disagrees with .*model\.safetensors at key 'unet\.cond_dim'"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def test_stage_config_disagreeing_with_cascade(folder_copy, encoder):
    config_path = folder_copy / "sr64" / "config.json"
    data = json.loads(config_path.read_text())
    data["num_steps"] = 9
    config_path.write_text(json.dumps(data))
    with pytest.raises(CascadeFolderError, match=r"at key 'stages\[2\]\.num_steps'"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)


def test_bad_last_stage_builds_no_unet(folder_copy, encoder, monkeypatch):
    (folder_copy / "sr64" / "model.safetensors").write_bytes(b"not safetensors")
    built = []
    original = pipeline_module._build_unet
    monkeypatch.setattr(pipeline_module, "_build_unet", lambda *args: built.append(args[0].name) or original(*args))
    with pytest.raises(CascadeFolderError, match="sr64"):
        ImagenPipeline.from_pretrained(folder_copy, text_encoder=encoder)
    assert built == []


def test_missing_text_encoder_copy(folder_copy):
    shutil.rmtree(folder_copy / "text_encoder")
    with pytest.raises(CascadeFileNotFoundError, match="text_encoder"):
        ImagenPipeline.from_pretrained(folder_copy)


# --- cascade folder writes ---------------------------------------------------------------


def test_write_stage_rejects_wrong_state_dict(pipe, tmp_path):
    stage = pipe.config.stages[0]
    state = dict(pipe.unets["base"].state_dict())
    state.pop(next(iter(state)))
    with pytest.raises(CascadeFolderError, match="missing key"):
        write_stage(tmp_path, stage, state)
    assert not (tmp_path / "base").exists()


def test_interrupted_write_keeps_old_file(pipe, tmp_path, monkeypatch):
    stage = pipe.config.stages[0]
    state = pipe.unets["base"].state_dict()
    write_stage(tmp_path, stage, state)
    before = (tmp_path / "base" / "model.safetensors").read_bytes()

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("imagen.cascade_folder.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_stage(tmp_path, stage, {key: value + 1 for key, value in state.items()})
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["config.json", "model.safetensors"]


def test_edited_sampling_default_is_accepted(pipe, tmp_path):
    stage = pipe.config.stages[1]
    write_stage(tmp_path, stage, pipe.unets[stage.name].state_dict())
    edited = dataclasses.replace(stage, guidance_scale=4.0, num_steps=7)
    (tmp_path / stage.name / "config.json").write_text(json.dumps(to_dict(edited)))
    loaded_cfg, _ = read_stage(tmp_path, stage.name)
    assert loaded_cfg == edited
