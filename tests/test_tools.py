"""tools/drawbench.py, tools/evaluate.py and tools/pack_cascade.py on a tiny two-stage cascade (16 -> 32 px, the 32 px stage cropped to 16)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from imagen.cascade_folder import read_cascade, stage_weights_path
from imagen.config import CascadeConfig, DiffusionConfig, StageConfig, UNetConfig, save_cascade_config
from imagen.data import resize_center_crop
from imagen.pipeline import ImagenPipeline
from imagen.text_encoder import FrozenTextEncoder

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"imagen_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


drawbench = load_tool("drawbench")
evaluate = load_tool("evaluate")

PROMPTS = [
    {"id": 1, "category": "Colors", "prompt": "A red colored car."},
    {"id": 2, "category": "Counting", "prompt": "Two cats and *three* dogs."},
    {"id": 3, "category": "Colors", "prompt": "A green [bright] bird."},
    {"id": 4, "category": "Text", "prompt": 'A sign that says "imagen_test".'},
    {"id": 5, "category": "Counting", "prompt": "Four horses."},
]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
SHAPES = ["circle", "square"]


def tiny_stage(name: str, resolution: int, lowres: int | None, crop: int | None, text_dim: int) -> StageConfig:
    unet = UNetConfig(
        in_channels=3, out_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1),
        self_attention=(False, True), cross_attention=(False, True), head_dim=8, cond_dim=16,
        text_embed_dim=text_dim, lowres_cond=lowres is not None, dropout=0.0, gradient_checkpointing=False,
    )
    return StageConfig(
        name=name, resolution=resolution, lowres_resolution=lowres, train_crop=crop,
        train_noise_aug_max=0.0 if lowres is None else 0.5, sample_noise_aug_level=0.0 if lowres is None else 0.2,
        guidance_scale=3.0 if lowres is None else 1.0, sampler="ddim", num_steps=2,
        thresholding="dynamic" if lowres is None else "static", unet=unet,
        diffusion=DiffusionConfig("cosine", "v" if lowres is None else "eps", -20.0, 20.0, 5.0),
    )


@pytest.fixture(scope="module")
def cascade_config(tiny_text_encoder_config) -> CascadeConfig:
    dim = tiny_text_encoder_config.dim
    stages = (tiny_stage("base", 16, None, None, dim), tiny_stage("sr32", 32, 16, 16, dim))
    return CascadeConfig(name="tools-tiny", text_encoder=tiny_text_encoder_config, stages=stages)


@pytest.fixture(scope="module")
def encoder(tiny_text_encoder_config) -> FrozenTextEncoder:
    return FrozenTextEncoder.from_config(tiny_text_encoder_config)


@pytest.fixture(scope="module")
def pipe(cascade_config, encoder) -> ImagenPipeline:
    """Random cascade whose output depends on the text: fresh U-Nets zero their residual branches, so add noise."""
    pipeline = ImagenPipeline.from_config(cascade_config, seed=0, text_encoder=encoder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for unet in pipeline.unets.values():
            for parameter in unet.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return pipeline


@pytest.fixture(scope="module")
def cascade_folder(pipe, tmp_path_factory) -> Path:
    return pipe.save_pretrained(tmp_path_factory.mktemp("cascade") / "tiny")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("drawbench") / "prompts.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in PROMPTS), encoding="utf-8")
    return path


def draw_image(color: str, shape: str, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), "gray")
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=color)
    return image


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    """16/ and 32/ size folders; 14 held-out and 6 training images; holdout image h13 exists only at 16 px."""
    root = tmp_path_factory.mktemp("emoji_like")
    entries = []
    for index in range(20):
        color, shape = COLORS[index % len(COLORS)], SHAPES[index // len(COLORS)]
        key = f"h{index:02d}" if index < 14 else f"t{index:02d}"
        entries.append({"id": key, "file": f"{key}.png", "caption": f"a {color} {shape}",
                        "split": "holdout" if index < 14 else "train"})
        for size in (16, 32):
            if not (size == 32 and key == "h13"):
                (root / str(size)).mkdir(exist_ok=True)
                draw_image(color, shape, size).save(root / str(size) / f"{key}.png")
    (root / "captions.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")
    return root


# --- drawbench ----------------------------------------------------------------------------------


def test_drawbench_grids_and_index(cascade_folder, prompts_file, tmp_path):
    out = tmp_path / "run"
    index = drawbench.main([str(prompts_file), "--cascade", str(cascade_folder), "--out", str(out), "--steps", "2", "1",
                            "--guidance", "base=2", "--images-per-prompt", "2", "--batch-size", "2", "--cell-size", "20",
                            "--no-progress"])
    assert index == out / "index.md"
    assert sorted(path.name for path in out.glob("*.png")) == ["colors.png", "counting.png", "text.png"]

    # One row per prompt, two images per row resized from 32 to 20 px, 2 px padding.
    with Image.open(out / "counting.png") as grid:
        assert grid.size == (2 * 22 + 2, 2 * 22 + 2)
    page = index.read_text(encoding="utf-8")
    for entry in PROMPTS:
        assert page.count(drawbench.escape_markdown(entry["prompt"])) == 1
    counting = page.split("## Counting")[1].split("## ")[0]
    assert counting.index("Two cats") < counting.index("Four horses")
    assert "![Counting](counting.png)" in counting
    assert "| base | 16x16 | ddim | 2 | 2 |  | dynamic |" in page
    assert "| sr32 | 32x32 | ddim | 1 | 1 | 0.2 | static |" in page


def test_drawbench_seeds_ignore_batching(cascade_config, prompts_file, tmp_path):
    config_path = tmp_path / "cascade.json"
    save_cascade_config(cascade_config, config_path)
    common = [str(prompts_file), "--config", str(config_path), "--stop-at-stage", "0", "--limit", "3", "--no-progress"]
    drawbench.main(common + ["--out", str(tmp_path / "a"), "--batch-size", "1"])
    drawbench.main(common + ["--out", str(tmp_path / "b"), "--batch-size", "3"])

    assert sorted(path.name for path in (tmp_path / "a").glob("*.png")) == ["colors.png", "counting.png"]
    with Image.open(tmp_path / "a" / "colors.png") as first, Image.open(tmp_path / "b" / "colors.png") as second:
        assert first.size == (2 * 18 + 2, 18 + 2)  # two 16 px images side by side
        assert first.tobytes() == second.tobytes()
    assert "Four horses" not in (tmp_path / "a" / "index.md").read_text(encoding="utf-8")


def test_read_prompts_rejects_missing_key(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": 1, "category": "Colors", "prompt": "a car"}\n{"id": 2, "prompt": "a cat"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected an object with keys 'id', 'category'"):
        drawbench.read_prompts(path)


def test_category_file_names_distinct():
    names = drawbench.category_file_names(["Gary Marcus et al.", "gary marcus et al", "DALL-E"])
    assert names == {"Gary Marcus et al.": "gary-marcus-et-al.png", "gary marcus et al": "gary-marcus-et-al-2.png",
                     "DALL-E": "dall-e.png"}


def test_per_stage_option_rejects_mixed_entries(prompts_file, capsys):
    with pytest.raises(SystemExit):
        drawbench.parse_args([str(prompts_file), "--config", "imagen-tiny", "--out", "x", "--steps", "3", "sr32=2"])
    assert "either plain values or STAGE=VALUE" in capsys.readouterr().err


# --- evaluate: ranking logic ----------------------------------------------------------------------


def table_loss_fn(own: list[int], true_loss: float, other_loss: float):
    """Fake model: the true caption of image i gets ``true_loss``, every other caption ``other_loss + its index / 100``."""
    def losses(index: int, candidates: torch.Tensor) -> torch.Tensor:
        return torch.tensor([true_loss if int(c) == own[index] else other_loss + int(c) / 100 for c in candidates])
    return losses


def test_ranking_true_caption_lowest():
    own = list(range(12))
    candidates = evaluate.draw_candidates(own, 12, 10, seed=3, keys=[str(i) for i in own])
    report = evaluate.ranking_report(evaluate.candidate_losses(table_loss_fn(own, 0.1, 1.0), candidates))
    assert report["top1"] == 1.0
    assert report["top5"] == 1.0
    assert report["mean_rank"] == 1.0
    assert report["chance_top1"] == pytest.approx(1 / 10)
    assert report["chance_top5"] == pytest.approx(5 / 10)


def test_ranking_true_caption_highest_or_tied():
    own = list(range(12))
    candidates = evaluate.draw_candidates(own, 12, 10, seed=3, keys=[str(i) for i in own])
    worst = evaluate.ranking_report(evaluate.candidate_losses(table_loss_fn(own, 9.0, 1.0), candidates))
    assert worst["top1"] == 0.0
    assert worst["top5"] == 0.0
    assert worst["mean_rank"] == 10.0
    tied = evaluate.ranking_report(evaluate.candidate_losses(lambda i, c: torch.ones(len(c)), candidates))
    assert tied["top1"] == 0.0  # a model that cannot tell captions apart must not score


def test_draw_candidates_rows():
    own = [4, 0, 4, 7]
    keys = ["a", "b", "c", "d"]
    candidates = evaluate.draw_candidates(own, 8, 5, seed=1, keys=keys)
    assert candidates.shape == (4, 5)
    assert candidates[:, 0].tolist() == own
    for row, text in zip(candidates.tolist(), own):
        assert len(set(row)) == 5
        assert text not in row[1:]
    # A row depends on its image key, not on the other images.
    alone = evaluate.draw_candidates([own[2]], 8, 5, seed=1, keys=[keys[2]])
    assert torch.equal(alone[0], candidates[2])
    assert not torch.equal(candidates, evaluate.draw_candidates(own, 8, 5, seed=2, keys=keys))
    with pytest.raises(ValueError, match="invalid number of candidates 9: expected 2 to 8"):
        evaluate.draw_candidates(own, 8, 9, seed=1, keys=keys)


def test_candidate_losses_share_noise(cascade_config, pipe):
    """Two copies of one caption get the same loss (common random numbers), whatever the forward chunking."""
    stage = cascade_config.stages[0]
    table = evaluate.encode_texts(pipe, ["a red circle", "a blue square"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    candidates = torch.tensor([0, 0, 1])
    with torch.no_grad():
        results = [evaluate.model_candidate_loss_fn(pipe.unets["base"], stage, images, ["x", "y"], table.embeds,
                                                    table.mask, draws=4, draws_per_forward=chunk, seed=0)(1, candidates)
                   for chunk in (1, 4)]
    torch.testing.assert_close(results[0][0], results[0][1])
    assert not torch.isclose(results[0][0], results[0][2])
    torch.testing.assert_close(results[0], results[1])


def test_stage_input_center_crop(cascade_config):
    stage = cascade_config.stages[1]
    pixels = torch.rand(3, 40, 48) * 2 - 1
    highres, lowres = evaluate.stage_input(pixels, stage, full_size=False)
    full = resize_center_crop(pixels, 32)
    torch.testing.assert_close(highres, full[:, 8:24, 8:24])
    assert lowres.shape == (3, 8, 8)
    full_highres, full_lowres = evaluate.stage_input(pixels, stage, full_size=True)
    assert full_highres.shape == (3, 32, 32)
    assert full_lowres.shape == (3, 16, 16)


# --- evaluate: end to end -------------------------------------------------------------------------


def test_evaluate_report(cascade_folder, data_folder, tmp_path, capsys):
    output = tmp_path / "report.json"
    report = evaluate.main([str(cascade_folder), str(data_folder), "--split", "holdout", "--levels", "3",
                            "--candidates", "6", "--draws", "2", "--batch-size", "8", "--no-progress",
                            "--output", str(output)])
    assert json.loads(capsys.readouterr().out) == report
    assert json.loads(output.read_text(encoding="utf-8")) == report

    base, sr = report["denoising"]["base"], report["denoising"]["sr32"]
    assert (base["images"], sr["images"]) == (14, 13)  # h13 has no 32 px file
    assert (base["input_size"], sr["input_size"]) == (16, 16)
    assert sr["noise_aug_level"] == 0.2
    for stage in (base, sr):
        assert math.isfinite(stage["loss"])
        assert stage["loss"] > 0
        assert len(stage["loss_per_t"]) == 3
        assert all(math.isfinite(value) and value > 0 for value in stage["loss_per_t"])

    ranking = report["caption_ranking"]
    assert ranking["images"] == 14
    assert ranking["chance_top1"] == pytest.approx(1 / 6)
    assert 0.0 <= ranking["top1"] <= ranking["top5"] <= 1.0


def test_evaluate_ids_file_and_bf16(cascade_folder, data_folder, tmp_path, capsys):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# three held-out ids\nh01\nh05\n\nt15\n", encoding="utf-8")
    report = evaluate.main([str(cascade_folder), str(data_folder), "--ids-file", str(ids_file), "--levels", "2",
                            "--candidates", "3", "--draws", "2", "--bf16", "--full-size", "--no-progress"])
    capsys.readouterr()
    assert report["denoising"]["base"]["images"] == 3
    assert report["denoising"]["sr32"]["input_size"] == 32
    assert math.isfinite(report["denoising"]["sr32"]["loss"])
    assert report["caption_ranking"]["chance_top1"] == pytest.approx(1 / 3)


def test_evaluate_rejects_unknown_split(cascade_folder, data_folder):
    with pytest.raises(ValueError, match="no records with split 'valid'"):
        evaluate.main([str(cascade_folder), str(data_folder), "--split", "valid", "--no-progress"])


# --- tools/pack_cascade.py ---------------------------------------------------------------------

pack_cascade = load_tool("pack_cascade")


def write_packing_config(config: CascadeConfig, folder: Path) -> Path:
    """Save ``config`` as the --config file of a pack run and return its path."""
    path = folder / "packing.json"
    save_cascade_config(config, path)
    return path


def test_pack_casts_weights_and_configs(cascade_config, cascade_folder, tmp_path):
    # A sampling default changed at packing time replaces the stored one.
    packing = dataclasses.replace(cascade_config, stages=(
        dataclasses.replace(cascade_config.stages[0], thresholding="static"), cascade_config.stages[1]))
    config_path = write_packing_config(packing, tmp_path)
    notice = tmp_path / "SOURCE.md"
    notice.write_text("attribution\n")
    out = tmp_path / "packed"
    pack_cascade.main(["--config", str(config_path), "--dtype", "bfloat16", "--out", str(out), "--notice", str(notice),
                       "--stage", f"base={cascade_folder}", "--stage", f"sr32={cascade_folder}"])

    assert read_cascade(out).stages[0].thresholding == "static"
    assert (out / "SOURCE.md").read_text() == "attribution\n"
    assert not out.with_name("packed.packing").exists()
    for stage in ("base", "sr32"):
        source = load_file(stage_weights_path(cascade_folder, stage))
        packed = load_file(stage_weights_path(out, stage))
        assert packed.keys() == source.keys()
        for key, value in source.items():
            expected = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert packed[key].dtype == expected.dtype, key
            assert torch.equal(packed[key], expected), key
    ImagenPipeline.from_pretrained(out)


def test_pack_in_place_keeps_weights(cascade_config, cascade_folder, tmp_path):
    folder = tmp_path / "cascade"
    shutil.copytree(cascade_folder, folder)
    config_path = write_packing_config(cascade_config, tmp_path)
    pack_cascade.main(["--config", str(config_path), "--dtype", "float16", "--out", str(folder),
                       "--stage", f"base={folder}", "--stage", f"sr32={folder}"])
    source = load_file(stage_weights_path(cascade_folder, "base"))
    packed = load_file(stage_weights_path(folder, "base"))
    for key, value in source.items():
        assert torch.equal(packed[key], value.to(torch.float16)), key


def test_pack_rejects_other_unet(cascade_config, cascade_folder, tmp_path):
    base = cascade_config.stages[0]
    wider = dataclasses.replace(base, unet=dataclasses.replace(base.unet, base_channels=16))
    config_path = write_packing_config(dataclasses.replace(cascade_config, stages=(wider, cascade_config.stages[1])), tmp_path)
    out = tmp_path / "packed"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="stage 'base': unet of .* differs from the packing config"):
        pack_cascade.main(["--config", str(config_path), "--out", str(out),
                           "--stage", f"base={cascade_folder}", "--stage", f"sr32={cascade_folder}"])
    assert (out / "keep.txt").read_text() == "old", "a failed pack replaced --out"


def test_pack_requires_every_stage(cascade_config, cascade_folder, tmp_path):
    config_path = write_packing_config(cascade_config, tmp_path)
    with pytest.raises(SystemExit):
        pack_cascade.main(["--config", str(config_path), "--out", str(tmp_path / "packed"),
                           "--stage", f"base={cascade_folder}"])
