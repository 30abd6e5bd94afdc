"""The ``imagen`` command, run in-process through ``imagen.cli.main`` on a tiny 16 -> 32 px cascade."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen import cli
from imagen.config import CascadeConfig, DiffusionConfig, StageConfig, UNetConfig, save_cascade_config
from imagen.pipeline import ImagenPipeline


def tiny_stage(name: str, resolution: int, lowres: int | None, text_dim: int) -> StageConfig:
    unet = UNetConfig(
        in_channels=3, out_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
        self_attention=(False, False), cross_attention=(False, True), head_dim=16, cond_dim=32,
        text_embed_dim=text_dim, lowres_cond=lowres is not None, dropout=0.0, gradient_checkpointing=False,
    )
    return StageConfig(
        name=name, resolution=resolution, lowres_resolution=lowres, train_crop=None,
        train_noise_aug_max=0.0 if lowres is None else 0.5, sample_noise_aug_level=0.0 if lowres is None else 0.2,
        guidance_scale=3.0, sampler="dpmpp_2m", num_steps=2, thresholding="dynamic", unet=unet,
        diffusion=DiffusionConfig("cosine", "v", -20.0, 20.0, 5.0),
    )


@pytest.fixture(scope="module")
def cascade_config(tiny_text_encoder_config) -> CascadeConfig:
    dim = tiny_text_encoder_config.dim
    stages = (tiny_stage("base", 16, None, dim), tiny_stage("sr32", 32, 16, dim))
    return CascadeConfig(name="cli-tiny", text_encoder=tiny_text_encoder_config, stages=stages)


@pytest.fixture(scope="module")
def cascade_dir(cascade_config, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_cascade")
    ImagenPipeline.from_config(cascade_config, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def config_file(cascade_config, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_config") / "cli-tiny.json"
    save_cascade_config(cascade_config, path)
    return path


def read_json(folder: Path) -> dict:
    files = list(folder.glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --- generate --------------------------------------------------------------------------------


def test_generate_writes_pngs_and_json(cascade_dir, tmp_path, capsys):
    out = tmp_path / "out"
    status = cli.main([
        "generate", "a red fox", "a blue bird", "--cascade", str(cascade_dir), "--out", str(out), "--seed", "5",
        "--steps", "2", "1", "--guidance", "4", "--num-images", "2", "--stage-outputs", "--no-progress",
    ])
    assert status == 0
    settings = read_json(out)
    assert settings["seed"] == 5
    assert [image["seed"] for image in settings["images"]] == [5, 6, 7, 8]
    assert [image["prompt"] for image in settings["images"]] == ["a red fox", "a red fox", "a blue bird", "a blue bird"]
    assert [stage["num_steps"] for stage in settings["stages"]] == [2, 1]
    assert [stage["guidance_scale"] for stage in settings["stages"]] == [4.0, 4.0]
    assert settings["cascade"]["folder"] == str(cascade_dir.resolve())
    for image in settings["images"]:
        assert Image.open(out / image["file"]).size == (32, 32)
        assert Image.open(out / image["stages"]["base"]).size == (16, 16)
    printed = capsys.readouterr().out.split()
    assert printed[-1].endswith(".json")
    assert len(printed) == 5


def test_json_command_reproduces_images(cascade_dir, tmp_path):
    first = tmp_path / "first"
    assert cli.main(["generate", "a red fox", "--cascade", str(cascade_dir), "--out", str(first), "--seed", "3",
                     "--height", "16", "--width", "32", "--no-progress"]) == 0
    settings = read_json(first)
    command = shlex.split(settings["command"])
    assert command[:2] == ["imagen", "generate"]
    second = tmp_path / "second"
    command[command.index("--out") + 1] = str(second)
    assert cli.main(command[1:] + ["--no-progress"]) == 0
    again = read_json(second)
    original, repeated = first / settings["images"][0]["file"], second / again["images"][0]["file"]
    assert Image.open(original).size == (64, 32)
    assert np.array_equal(pixels(original), pixels(repeated))


def test_generate_does_not_overwrite(cascade_dir, tmp_path):
    arguments = ["generate", "a fox", "--cascade", str(cascade_dir), "--out", str(tmp_path), "--seed", "1",
                 "--stop-at-stage", "base", "--no-progress"]
    assert cli.main(arguments) == 0
    assert cli.main(arguments) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["imagen-seed1-2.json", "imagen-seed1.json"]
    assert Image.open(tmp_path / "imagen-seed1-0.png").size == (16, 16)


def test_random_fallback_warns(config_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cli, "DEFAULT_CASCADE_DIR", tmp_path / "no_default_cascade")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(config_file))
    with caplog.at_level(logging.WARNING, logger="imagen.cli"):
        status = cli.main(["generate", "a fox", "--out", str(tmp_path / "out"), "--seed", "0", "--no-progress"])
    assert status == 0
    assert "RANDOM U-Net weights" in caplog.text
    settings = read_json(tmp_path / "out")
    assert settings["cascade"]["random_weights"] is True
    assert settings["cascade"]["config"] == str(config_file)


def test_default_cascade_folder_is_used(cascade_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cli, "DEFAULT_CASCADE_DIR", cascade_dir)
    with caplog.at_level(logging.WARNING, logger="imagen.cli"):
        status = cli.main(["generate", "a fox", "--out", str(tmp_path), "--seed", "0", "--no-progress"])
    assert status == 0
    assert "RANDOM" not in caplog.text
    assert read_json(tmp_path)["cascade"]["folder"] == str(cascade_dir.resolve())


def test_config_option_builds_random_cascade(config_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="imagen.cli"):
        status = cli.main(["generate", "a fox", "--config", str(config_file), "--init-seed", "4", "--out", str(tmp_path),
                           "--stop-at-stage", "0", "--no-progress"])
    assert status == 0
    assert "RANDOM" in caplog.text
    settings = read_json(tmp_path)
    assert settings["cascade"]["init_seed"] == 4
    assert [stage["name"] for stage in settings["stages"]] == ["base"]


# --- info ------------------------------------------------------------------------------------


def test_info_prints_stages(cascade_dir, capsys):
    assert cli.main(["info", str(cascade_dir)]) == 0
    text = capsys.readouterr().out
    assert "cascade cli-tiny" in text
    assert "16 -> 32" in text
    lines = [line.split()[0] for line in text.splitlines()]
    assert "base" in lines
    assert "sr32" in lines


def test_info_json_counts_parameters(cascade_dir, capsys):
    assert cli.main(["info", str(cascade_dir), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    pipeline = ImagenPipeline.from_pretrained(cascade_dir)
    expected = {name: sum(p.numel() for p in unet.parameters()) for name, unet in pipeline.unets.items()}
    assert {stage["name"]: stage["parameters"] for stage in description["stages"]} == expected
    assert all(stage["status"] == "ok" for stage in description["stages"])


def test_info_shipped_config(capsys):
    assert cli.main(["info", "imagen-tiny"]) == 0
    text = capsys.readouterr().out
    assert "256 -> 1024" in text


def test_info_reports_missing_weights(cascade_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cascade_dir, broken)
    (broken / "sr32" / "model.safetensors").unlink()
    assert cli.main(["info", str(broken)]) == 1
    assert "stage sr32: error: missing file" in capsys.readouterr().out


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "invalid num_inference_steps 0"),
        (["--guidance", "-1"], "invalid guidance_scale -1.0"),
        (["--steps", "1", "2", "3"], "got 3 values for num_inference_steps"),
        (["--height", "15"], "height/width 15x16"),
        (["--stop-at-stage", "sr128"], "unknown stage 'sr128'"),
    ],
)
def test_bad_settings_exit_with_message(cascade_dir, tmp_path, capsys, extra, message):
    status = cli.main(["generate", "a fox", "--cascade", str(cascade_dir), "--out", str(tmp_path), "--no-progress", *extra])
    error = capsys.readouterr().err
    assert status == 1
    assert message in error
    assert "Traceback" not in error
    assert not list(tmp_path.glob("*.png"))


def test_missing_cascade_folder(tmp_path, capsys):
    status = cli.main(["generate", "a fox", "--cascade", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 1
    assert "imagen generate: error: cascade folder" in error
    assert "nowhere" in error


def test_invalid_command_line_exits_2(capsys):
    assert cli.main(["generate"]) == 2
    assert cli.main(["generate", "a fox", "--sampler", "euler"]) == 2
    assert "invalid choice: 'euler'" in capsys.readouterr().err


def test_info_unknown_target(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "nothing")]) == 1
    error = capsys.readouterr().err
    assert "is not a cascade folder, and cascade config" in error
    assert "imagen-tiny" in error
