"""Trainer: overfitting, exact resume, gradient accumulation, fine-tuning, checkpoints, two processes."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

from imagen.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint
from imagen.config import CascadeConfig, DiffusionConfig, StageConfig, UNetConfig, save_cascade_config
from imagen.ema import ExponentialMovingAverage
from imagen.train import main as train_main
from imagen.trainer import TrainOptions, Trainer, lr_factor, train

COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30), "yellow": (230, 230, 30)}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator; accelerate keeps one global state per process otherwise."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(lowres: bool, text_dim: int) -> UNetConfig:
    return UNetConfig(in_channels=3, out_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
                      self_attention=(False, True), cross_attention=(False, True), head_dim=16, cond_dim=32,
                      text_embed_dim=text_dim, lowres_cond=lowres, dropout=0.0, gradient_checkpointing=False)


@pytest.fixture(scope="module")
def cascade_file(tiny_text_encoder_config, tmp_path_factory) -> Path:
    """A 16 px base stage and a 16 -> 32 px super-resolution stage trained on 16 px crops."""
    diffusion = DiffusionConfig(schedule="cosine", objective="v", log_snr_min=-20.0, log_snr_max=20.0, min_snr_gamma=5.0)
    dim = tiny_text_encoder_config.dim
    # No min-SNR weighting here: it scales the v loss at high noise, where only the caption tells
    # the colour, by about the SNR. With it, 100 steps did not tell red from blue.
    base = StageConfig(name="base", resolution=16, lowres_resolution=None, train_crop=None, train_noise_aug_max=0.0,
                       sample_noise_aug_level=0.0, guidance_scale=3.0, sampler="ddim", num_steps=12, thresholding="dynamic",
                       unet=tiny_unet(False, dim), diffusion=dataclasses.replace(diffusion, min_snr_gamma=None))
    sr = StageConfig(name="sr32", resolution=32, lowres_resolution=16, train_crop=16, train_noise_aug_max=0.5,
                     sample_noise_aug_level=0.1, guidance_scale=1.0, sampler="ddim", num_steps=4, thresholding="static",
                     unet=tiny_unet(True, dim), diffusion=diffusion)
    path = tmp_path_factory.mktemp("cascade") / "tiny.json"
    save_cascade_config(CascadeConfig(name="tiny-test", text_encoder=tiny_text_encoder_config, stages=(base, sr)), path)
    return path


def write_colour_folder(folder: Path, size: int = 32) -> Path:
    """Solid-colour squares with captions ("a red square", ...) and one held-out image."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (size, size), rgb).save(folder / f"{name}.png")
        lines.append({"file": f"{name}.png", "caption": f"a {name} square", "split": "train"})
    Image.new("RGB", (size, size), (128, 0, 128)).save(folder / "purple.png")
    lines.append({"file": "purple.png", "caption": "a purple square", "split": "holdout"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("colours") / "data")


def options(cascade_file: Path, data: Path, output: Path, **overrides) -> TrainOptions:
    settings = dict(stage="base", output=output, config=cascade_file, data=data, split="train", steps=4, batch_size=4,
                    lr=1e-3, warmup_steps=2, num_workers=0, progress=False, log_every=2, checkpoint_every=100,
                    export_at_end=False, ema_decay=0.9)
    settings.update(overrides)
    return TrainOptions(**settings)


def cli_args(cascade_file: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--config", str(cascade_file), "--data", str(data), "--output", str(output), "--split", "train",
            "--num-workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "2", *extra]


def load_checkpoint_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Model weights, EMA weights and AdamW state of a checkpoint, flattened to name -> tensor."""
    ema = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)
    optimizer = torch.load(folder / "optimizer.bin", weights_only=False)
    optimizer_state = {f"{index}.{key}": value for index, state in optimizer["state"].items() for key, value in state.items()}
    return {"model": load_file(folder / "model.safetensors"), "ema": ema["weights"], "optimizer": optimizer_state,
            "ema_updates": {"count": torch.tensor(ema["num_updates"])}}


def assert_bit_equal(left: dict, right: dict) -> None:
    for part in left:
        assert left[part].keys() == right[part].keys(), part
        different = [key for key in left[part] if not torch.equal(left[part][key], right[part][key])]
        assert not different, f"{part} differs at {different[:3]}"


# --- EMA -------------------------------------------------------------------------------------


def test_ema_update_and_warmup() -> None:
    model = torch.nn.Linear(2, 1)
    ema = ExponentialMovingAverage(model, decay=0.5, warmup=True)
    start = model.weight.detach().clone()
    assert ema.current_decay() == pytest.approx(2 / 11)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = (2 / 11) * start + (9 / 11) * model.weight.detach()
    assert torch.allclose(ema.model.weight, expected)
    for _ in range(20):
        ema.update(model)
    assert ema.current_decay() == 0.5  # warm-up exceeds the configured decay after a few updates


def test_ema_state_round_trip_and_missing_key() -> None:
    model = torch.nn.Linear(2, 1)
    ema = ExponentialMovingAverage(model, decay=0.9, warmup=False)
    ema.update(torch.nn.Linear(2, 1))
    state = ema.state_dict()
    other = ExponentialMovingAverage(torch.nn.Linear(2, 1), decay=0.1)
    other.load_state_dict(state)
    assert other.num_updates == 1
    assert other.decay == 0.9
    assert torch.equal(other.model.weight, ema.model.weight)
    del state["num_updates"]
    with pytest.raises(KeyError, match=r"EMA state lacks \['num_updates'\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="invalid EMA decay 1.5"):
        ExponentialMovingAverage(model, decay=1.5)


# --- caption embeddings ----------------------------------------------------------------------


def test_caption_embeddings_memory_and_read_only(tiny_text_encoder_config, tmp_path: Path) -> None:
    from imagen.caption_embeddings import CaptionEmbeddings
    from imagen.text_encoder import EmbeddingCache, FrozenTextEncoder

    encoder = FrozenTextEncoder.from_config(tiny_text_encoder_config)
    captions = ["a red square", "a blue square", "a red square"]
    reader = CaptionEmbeddings(EmbeddingCache(tmp_path / "cache", encoder), write_cache=False)
    embeds, mask = reader.lookup(captions)
    assert not (tmp_path / "cache").exists(), "a process without write_cache wrote the cache"
    expected_embeds, expected_mask = encoder.encode(captions)
    assert torch.equal(mask, expected_mask)
    assert torch.allclose(embeds, expected_embeds, atol=1e-5)

    # A memory budget below one caption still returns every row, read through the disk cache.
    writer = CaptionEmbeddings(EmbeddingCache(tmp_path / "cache", encoder), max_bytes=16)
    embeds_small, mask_small = writer.lookup(captions)
    assert torch.equal(mask_small, expected_mask)
    assert torch.allclose(embeds_small, expected_embeds, atol=1e-5)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"steps": 0}, "invalid --steps 0"),
    ({"lr": -1.0}, "invalid --lr -1.0"),
    ({"caption_dropout": 1.5}, "invalid --caption-dropout 1.5"),
    ({"mixed_precision": "fp8"}, "invalid --mixed-precision 'fp8'"),
    ({"grad_clip": -1.0}, "invalid --grad-clip -1.0"),
    ({"lr_schedule": "linear"}, "invalid --lr-schedule 'linear'"),
    ({"shards": Path("x")}, "pass exactly one of --data"),
    ({"config": None}, "no cascade given"),
])
def test_invalid_options_raise(cascade_file: Path, colour_data: Path, tmp_path: Path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        options(cascade_file, colour_data, tmp_path, **overrides).validate()


def test_lr_factor_warmup_and_cosine() -> None:
    constant, cosine = lr_factor(4, 20, "constant"), lr_factor(4, 20, "cosine")
    assert [constant(n) for n in range(4)] == [cosine(n) for n in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert all(constant(n) == 1.0 for n in range(4, 40))
    decay = [cosine(n) for n in range(4, 20)]
    assert all(a > b for a, b in zip(decay, decay[1:])), decay
    assert 0.99 < decay[0] < 1.0
    assert 0.0 < decay[-1] < 0.01
    # Halfway through the decay the rate is half the peak.
    assert lr_factor(0, 101, "cosine")(50) == pytest.approx(0.5)
    assert lr_factor(0, 10, "cosine")(10) == 0.0
    with pytest.raises(ValueError, match="invalid learning-rate schedule 'step'"):
        lr_factor(0, 10, "step")


def test_cosine_schedule_sets_optimizer_lr(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    """The scheduler saved with each checkpoint has lowered the learning rate along the cosine."""
    extra = ["--stage", "base", "--steps", "6", "--lr-schedule", "cosine", "--checkpoint-every", "3", "--no-export",
             "--batch-size", "2", "--log-level", "WARNING"]
    assert train_main(cli_args(cascade_file, colour_data, tmp_path / "run", *extra)) == 0
    for step in (3, 6):
        scheduler = torch.load(tmp_path / "run" / "checkpoints" / f"step-{step:08d}" / "scheduler.bin", weights_only=False)
        assert scheduler["_last_lr"][0] == pytest.approx(1e-3 * lr_factor(2, 6, "cosine")(step))
    assert 0.0 < lr_factor(2, 6, "cosine")(3) < 1.0


def test_unknown_stage_names_stages(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"no stage named 'sr64'.*\['base', 'sr32'\]"):
        Trainer(options(cascade_file, colour_data, tmp_path, stage="sr64"))


def test_resume_ignores_sampling_defaults(cascade_file: Path) -> None:
    from imagen.config import load_cascade_config
    from imagen.trainer import TrainerState

    stage = load_cascade_config(cascade_file).stages[0]
    saved = TrainerState(seed=0, global_batch=4, stage=stage, num_processes=1)
    saved.step = 7
    resampled = dataclasses.replace(stage, guidance_scale=9.0, num_steps=3, thresholding="none", sampler="ddpm")
    resumed = TrainerState(seed=0, global_batch=4, stage=resampled, num_processes=1)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.step == 7

    wider = dataclasses.replace(stage, unet=dataclasses.replace(stage.unet, base_channels=stage.unet.base_channels * 2))
    with pytest.raises(ValueError, match="differs at key 'unet.base_channels'"):
        TrainerState(seed=0, global_batch=4, stage=wider, num_processes=1).load_state_dict(saved.state_dict())


# --- training --------------------------------------------------------------------------------


def test_overfit_solid_colours(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    """A tiny base stage learns four captioned colours; each prompt then samples its own colour."""
    from imagen.pipeline import ImagenPipeline

    output = tmp_path / "run"
    # fp32: for a model this small, bf16 autocast ran 2-3x slower on a 2-core x86 CPU (casts dominate).
    summary = train(options(cascade_file, colour_data, output, steps=100, batch_size=16, lr=3e-3, warmup_steps=10,
                            ema_decay=0.9, log_every=50, checkpoint_every=100, sample_every=100, sample_steps=8,
                            export_at_end=True))
    assert summary["step"] == 100
    grid = Image.open(output / "samples" / "step-00000100.png")
    assert grid.size == (4 * 18 + 2, 18 + 2), "the grid is one row of four 16 px samples with 2 px padding"

    pipeline = ImagenPipeline.from_pretrained(output / "cascade", stop_at_stage="base")
    prompts = [f"a {name} square" for name in COLOURS]
    images = pipeline(prompts, seed=0, output_type="pt", progress=False).images
    targets = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    means = images.mean(dim=(2, 3))
    nearest = torch.cdist(means, targets).argmin(dim=1)
    assert nearest.tolist() == list(range(len(COLOURS))), f"mean colours {means.tolist()} do not match their prompts"


def test_resume_is_bit_exact(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    """Stopping at step 4 and resuming to 6 equals an uninterrupted 6-step run (SR stage: crops, noise augmentation)."""
    extra = ["--stage", "sr32", "--batch-size", "2", "--accumulation", "2", "--caption-dropout", "0.5",
             "--checkpoint-every", "2", "--no-export", "--log-level", "WARNING"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_main(cli_args(cascade_file, colour_data, whole, "--steps", "6", *extra)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train_main(cli_args(cascade_file, colour_data, parts, "--steps", "4", *extra)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train_main(cli_args(cascade_file, colour_data, parts, "--steps", "6", "--resume", "latest", *extra)) == 0

    expected = load_checkpoint_tensors(whole / "checkpoints" / "step-00000006")
    resumed = load_checkpoint_tensors(parts / "checkpoints" / "step-00000006")
    assert int(resumed["ema_updates"]["count"]) == 6
    assert_bit_equal(expected, resumed)
    # The run really moved: weights at step 6 differ from those at step 4.
    middle = load_checkpoint_tensors(parts / "checkpoints" / "step-00000004")
    assert not all(torch.equal(middle["model"][k], resumed["model"][k]) for k in resumed["model"])


def test_gradient_accumulation_matches_large_batch(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    """Accumulating 2 micro-batches of 2 gives the loss, gradients and update of one batch of 4."""
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        AcceleratorState._reset_state(reset_partial_state=True)
        trainer = Trainer(options(cascade_file, colour_data, tmp_path / f"b{batch_size}", stage="sr32",
                                  batch_size=batch_size, accumulation=accumulation, caption_dropout=0.5))
        loss = trainer.accumulate_gradients(trainer.batches(0))
        gradients = {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()}
        trainer.apply_update()
        weights = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}
        results.append((loss, gradients, weights))
    (loss_a, gradients_a, weights_a), (loss_b, gradients_b, weights_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    for name in gradients_a:
        assert torch.allclose(gradients_a[name], gradients_b[name], rtol=1e-4, atol=1e-6), name
    for name in weights_a:
        # Adam scales each update to about lr whatever the gradient's size, so rounding noise in a
        # gradient that is zero in exact arithmetic (a bias before a normalisation) moves the weight
        # by up to lr in either run. Compare the elements with a real gradient.
        real = gradients_a[name].abs() > 1e-4
        assert torch.allclose(weights_a[name][real], weights_b[name][real], rtol=1e-5, atol=1e-6), name
    assert sum(int((gradient.abs() > 1e-4).sum()) for gradient in gradients_a.values()) > 1000


def test_finetune_changes_only_its_stage(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    from imagen.cascade_folder import read_stage
    from imagen.pipeline import ImagenPipeline

    source = tmp_path / "pretrained"
    ImagenPipeline.from_config(cascade_file, seed=3).save_pretrained(source)
    before = {path.relative_to(source): path.read_bytes() for path in source.rglob("*") if path.is_file()}
    _, initial = read_stage(source, "sr32")

    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = Trainer(options(None, colour_data, tmp_path / "run", config=None, init_from=source, stage="sr32",
                              steps=2, lr=5e-3, checkpoint_every=2, export=tmp_path / "tuned"))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.equal(initial[key], value) for key, value in unwrapped.state_dict().items()), "not started from --init-from"
    optimized = [parameter for group in trainer.optimizer.param_groups for parameter in group["params"]]
    assert len(optimized) == len(list(unwrapped.parameters()))
    assert {id(p) for p in optimized} == {id(p) for p in unwrapped.parameters()}
    trainer.fit()

    after_source = {path.relative_to(source): path.read_bytes() for path in source.rglob("*") if path.is_file()}
    assert after_source == before, "--init-from folder was modified"
    tuned = tmp_path / "tuned"
    for name in ("base/model.safetensors", "base/config.json", "cascade.json"):
        assert (tuned / name).read_bytes() == before[Path(name)], f"{name} is not byte-identical"
    _, exported = read_stage(tuned, "sr32")
    assert any(not torch.equal(exported[key], initial[key]) for key in initial), "the fine-tuned stage did not change"
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-00000002" / "optimizer.bin", weights_only=False)
    assert len(saved["state"]) == len(optimized)


def test_export_rejects_other_stage_config(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    from imagen.cascade_folder import write_cascade_config
    from imagen.config import load_cascade_config

    other = load_cascade_config(cascade_file)
    other = dataclasses.replace(other, stages=(dataclasses.replace(other.stages[0], num_steps=99), *other.stages[1:]))
    target = tmp_path / "cascade"
    write_cascade_config(target, other)
    with pytest.raises(ValueError, match="differs at key 'num_steps' \\(99 there, 12 in this run\\)"):
        train(options(cascade_file, colour_data, tmp_path / "run", steps=1, export=target))
    assert not (target / "base").exists()
    assert not (tmp_path / "run" / "checkpoints").exists(), "the mismatch was found only after training"


def test_finetune_export_lists_new_config(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    """Fine-tuning with another training config exports a cascade that lists it. Other stages stay byte-identical."""
    from imagen.cascade_folder import read_cascade, read_stage
    from imagen.config import load_cascade_config
    from imagen.pipeline import ImagenPipeline

    source = tmp_path / "pretrained"
    ImagenPipeline.from_config(cascade_file, seed=3).save_pretrained(source)
    cascade = load_cascade_config(cascade_file)
    changed = dataclasses.replace(cascade.stages[0], diffusion=dataclasses.replace(cascade.stages[0].diffusion, min_snr_gamma=2.0))
    changed_file = tmp_path / "changed.json"
    save_cascade_config(dataclasses.replace(cascade, stages=(changed, *cascade.stages[1:])), changed_file)

    AcceleratorState._reset_state(reset_partial_state=True)
    train(options(changed_file, colour_data, tmp_path / "run", init_from=source, steps=1, export=tmp_path / "tuned"))
    tuned = tmp_path / "tuned"
    assert read_cascade(tuned).stage("base") == changed
    assert read_stage(tuned, "base")[0] == changed
    assert read_cascade(source).stage("base").diffusion.min_snr_gamma is None
    for name in ("sr32/model.safetensors", "sr32/config.json"):
        assert (tuned / name).read_bytes() == (source / name).read_bytes(), f"{name} is not byte-identical"


def test_shards_train_and_skip_unreadable(cascade_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    with webdataset.TarWriter(str(shards / "000.tar")) as writer:
        for name, rgb in COLOURS.items():
            buffer = io.BytesIO()
            Image.new("RGB", (24, 24), rgb).save(buffer, format="PNG")
            writer.write({"__key__": name, "png": buffer.getvalue(), "txt": f"a {name} square"})
        writer.write({"__key__": "broken", "png": b"not a png", "txt": "broken"})
    with caplog.at_level(logging.INFO):
        summary = train(options(cascade_file, None, tmp_path / "run", shards=shards, split=None, steps=3,
                                shuffle_buffer=1, batch_size=5))
    assert summary["skipped"] == 1
    assert "skipped unreadable image" in caplog.text
    assert "1 skipped" in caplog.text


def test_folder_skips_unreadable_image(cascade_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = write_colour_folder(tmp_path / "data")
    (data / "red.png").write_bytes(b"truncated")
    with caplog.at_level(logging.INFO):
        summary = train(options(cascade_file, data, tmp_path / "run", steps=2, mixed_precision="bf16"))
    assert summary["skipped"] == 1
    assert "red.png" in caplog.text


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoints_keep_newest_and_reject_damage(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    train(options(cascade_file, colour_data, output, steps=6, checkpoint_every=2, keep_checkpoints=2))
    assert [step for step, _ in list_checkpoints(output / "checkpoints")] == [4, 6]
    latest = latest_checkpoint(output / "checkpoints")
    manifest = verify_checkpoint(latest)
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl",
            "custom_checkpoint_1.pkl", "random_states_0.pkl"} <= set(manifest["files"])

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="checkpoint has seed 0, this run 1"):
        Trainer(options(cascade_file, colour_data, output, steps=8, resume="latest", seed=1))

    optimizer = latest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(CheckpointError, match="optimizer.bin is corrupt"):
        Trainer(options(cascade_file, colour_data, output, steps=8, resume="latest"))
    (latest / "custom_checkpoint_0.pkl").unlink()
    with pytest.raises(CheckpointError, match="missing custom_checkpoint_0.pkl"):
        verify_checkpoint(latest)
    (output / "checkpoints" / "step-00000004" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        verify_checkpoint(output / "checkpoints" / "step-00000004")


def test_interrupted_save_keeps_previous_checkpoint(cascade_file: Path, colour_data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "run"
    trainer = Trainer(options(cascade_file, colour_data, output, steps=4, checkpoint_every=2))
    original = trainer.accelerator.save_state

    def killed_midway(folder: str, **kwargs):
        if folder.endswith("step-00000004"):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt("killed while saving")
        return original(folder, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert latest_checkpoint(output / "checkpoints") == output / "checkpoints" / "step-00000002"
    verify_checkpoint(output / "checkpoints" / "step-00000002")

    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(options(cascade_file, colour_data, output, steps=4, checkpoint_every=2, resume="latest"))
    assert resumed.state.step == 2
    resumed.fit()
    assert [step for step, _ in list_checkpoints(output / "checkpoints")] == [2, 4]
    assert not list((output / "checkpoints").glob(".tmp-*")), "the temporary folder of the killed save was left behind"


# --- several processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_on_cpu(cascade_file: Path, colour_data: Path, tmp_path: Path) -> None:
    """torchrun starts two gloo ranks; they train in step, and rank 0 alone writes each checkpoint once."""
    output = tmp_path / "ddp"
    # A large AdamW epsilon makes each update about lr * gradient, so rounding noise in gradients
    # that are zero in exact arithmetic stays small and the runs below can be compared closely.
    sgd_like = ["--adam-eps", "1.0", "--lr", "0.05", "--warmup-steps", "0", "--grad-clip", "0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "imagen.train",
               *cli_args(cascade_file, colour_data, output, "--stage", "base", "--steps", "4", "--batch-size", "2",
                         "--checkpoint-every", "2", "--keep-checkpoints", "5", *sgd_like)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es), global batch 4" in result.stderr

    checkpoints = list_checkpoints(output / "checkpoints")
    assert [step for step, _ in checkpoints] == [2, 4]
    assert not list((output / "checkpoints").glob(".*")), "a temporary checkpoint folder was left behind"
    for _, folder in checkpoints:
        files = set(verify_checkpoint(folder)["files"])
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= files, "rank 1 did not save its state"
        state = torch.load(folder / "custom_checkpoint_1.pkl", weights_only=False)
        assert state["num_processes"] == 2
    assert len(list((output / "cascade").rglob("model.safetensors"))) == 1

    # Two ranks with batch 2 read the same samples and noise as one process with batch 4.
    single = tmp_path / "single"
    train(options(cascade_file, colour_data, single, steps=4, batch_size=4, checkpoint_every=4, adam_eps=1.0, lr=0.05,
                  warmup_steps=0, grad_clip=None))
    two = load_file(output / "checkpoints" / "step-00000004" / "model.safetensors")
    one = load_file(single / "checkpoints" / "step-00000004" / "model.safetensors")
    for key in one:
        assert torch.allclose(two[key], one[key], rtol=1e-4, atol=1e-6), key
    earlier = load_file(output / "checkpoints" / "step-00000002" / "model.safetensors")
    moved = max(float((two[key] - earlier[key]).abs().max()) for key in two)
    assert moved > 1e-4, "the weights hardly changed, so the comparison above proves nothing"
