"""Training data: caption files, skipped images, super-resolution pairs and crops, batch order, shards."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader

from imagen.data import (
    ImageCaptionFolder,
    ImageSpec,
    StepBatchSampler,
    collate_samples,
    make_training_pair,
    read_caption_records,
    resize_center_crop,
    resolve_image_folder,
)
from imagen.images import from_pil, resize
from imagen.shards import ShardStream


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """An RGB image of smooth random colours (so resizing keeps detail to compare)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, size[1] // 8), max(2, size[0] // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def write_jsonl(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")


@pytest.fixture
def jsonl_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    entries = []
    for index in range(6):
        noise_image((40, 40), index).save(folder / f"img{index}.png")
        entries.append({"file": f"img{index}.png", "caption": f"picture {index}", "tags": ["x"],
                        "split": "holdout" if index == 5 else "train"})
    entries.append({"file": "absent.png", "caption": "no such file", "split": "train"})
    write_jsonl(folder / "captions.jsonl", entries)
    return folder


def test_jsonl_captions_and_split(jsonl_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imagen.data"):
        every = read_caption_records(jsonl_folder)
    assert [record.caption for record in every] == [f"picture {index}" for index in range(6)]
    assert "left out 1 of 7 captions" in caplog.text
    train = read_caption_records(jsonl_folder, split="train")
    assert [record.path.name for record in train] == [f"img{index}.png" for index in range(5)]
    with pytest.raises(ValueError, match="no records with split 'val'.*'holdout', 'train'"):
        read_caption_records(jsonl_folder, split="val")


def test_jsonl_invalid_line_names_file_and_line(tmp_path: Path) -> None:
    noise_image((16, 16), 0).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"file": "a.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: expected an object with string keys 'file' and 'caption'"):
        read_caption_records(tmp_path)
    (tmp_path / "captions.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:1: invalid JSON"):
        read_caption_records(tmp_path)


def test_txt_captions_beside_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for index in range(3):
        noise_image((20, 20), index).save(tmp_path / f"{index}.png")
    (tmp_path / "0.txt").write_text("a red square\n")
    (tmp_path / "1.txt").write_text("a blue square")
    with caplog.at_level(logging.WARNING, logger="imagen.data"):
        records = read_caption_records(tmp_path)
    assert [(record.path.name, record.caption) for record in records] == [("0.png", "a red square"), ("1.png", "a blue square")]
    assert "left out 1 images without a .txt caption" in caplog.text


def test_no_captions_raises(tmp_path: Path) -> None:
    noise_image((20, 20), 0).save(tmp_path / "0.png")
    with pytest.raises(ValueError, match="no captioned images found"):
        read_caption_records(tmp_path)


def test_size_subfolders_pick_smallest_large_enough(tmp_path: Path) -> None:
    for size in (16, 64):
        (tmp_path / str(size)).mkdir()
        noise_image((size, size), 0).save(tmp_path / str(size) / "a.png")
    write_jsonl(tmp_path / "captions.jsonl", [{"file": "a.png", "caption": "a"}])
    assert resolve_image_folder(tmp_path, 16) == tmp_path / "16"
    assert resolve_image_folder(tmp_path, 32) == tmp_path / "64"
    with pytest.raises(ValueError, match=r"size subfolders: \[16, 64\], none >= 128"):
        resolve_image_folder(tmp_path, 128)
    with pytest.raises(FileNotFoundError, match="data folder .* not found"):
        resolve_image_folder(tmp_path / "missing", 16)
    dataset = ImageCaptionFolder(tmp_path, ImageSpec(32))  # captions.jsonl one level up
    assert dataset.folder == tmp_path / "64"
    assert dataset[0]["image"].shape == (3, 32, 32)


def test_unreadable_and_small_images_are_skipped(tmp_path: Path) -> None:
    noise_image((32, 32), 0).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    noise_image((8, 8), 1).save(tmp_path / "small.png")
    noise_image((32, 32), 2).save(tmp_path / "good2.png")
    write_jsonl(tmp_path / "captions.jsonl", [
        {"file": "broken.png", "caption": "broken"},
        {"file": "small.png", "caption": "small"},
        {"file": "good.png", "caption": "good"},
        {"file": "good2.png", "caption": "good2"},
    ])
    dataset = ImageCaptionFolder(tmp_path, ImageSpec(16))
    first = dataset[(0, 0)]
    assert first["caption"] == "good"
    reasons = [reason for _, reason in first["skipped"]]
    assert len(reasons) == 2
    assert "unreadable image" in reasons[0]
    assert "8x8, smaller than the 16 px" in reasons[1]
    again = dataset[(1, 0)]  # known bad files are passed over without a second report
    assert again["caption"] == "good"
    assert again["skipped"] == []
    assert dataset[(3, 0)]["caption"] == "good2"


def test_all_images_unusable_raises(tmp_path: Path) -> None:
    noise_image((8, 8), 1).save(tmp_path / "small.png")
    (tmp_path / "small.txt").write_text("small")
    dataset = ImageCaptionFolder(tmp_path, ImageSpec(16))
    with pytest.raises(RuntimeError, match="no usable image .* smaller than 16 px"):
        dataset[0]


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("nothing")
    image = ImageCaptionFolder(tmp_path, ImageSpec(16))[0]["image"]
    assert torch.equal(image, torch.ones_like(image))


def test_resize_center_crop_keeps_middle() -> None:
    # A 40x20 image, grey but for a black left edge and a white right edge, 5 px each: the
    # center crop (source columns 10..29, filter reach 4 px) must not see the edges.
    array = np.full((20, 40, 3), 128, dtype=np.uint8)
    array[:, :5] = 0
    array[:, 35:] = 255
    image = from_pil([Image.fromarray(array)])[0]
    cropped = resize_center_crop(image, 10)
    assert cropped.shape == (3, 10, 10)
    expected = 128 / 127.5 - 1
    assert torch.allclose(cropped, torch.full_like(cropped, expected), atol=1e-3)


def test_super_resolution_pair_is_a_downsample() -> None:
    image = from_pil([noise_image((48, 40), 3)])[0]
    highres, lowres = make_training_pair(image, ImageSpec(32, 8))
    assert highres.shape == (3, 32, 32)
    assert lowres.shape == (3, 8, 8)
    assert torch.equal(lowres, resize(highres[None], (8, 8))[0])
    assert torch.equal(highres, resize_center_crop(image, 32))


def test_random_crops_match_lowres_crops() -> None:
    image = from_pil([noise_image((64, 64), 4)])[0]
    spec = ImageSpec(64, 16, crop=16)
    full_high = resize_center_crop(image, 64)
    full_low = resize(full_high[None], (16, 16))[0]
    offsets = set()
    for seed in range(12):
        highres, lowres = make_training_pair(image, spec, torch.Generator().manual_seed(seed))
        assert highres.shape == (3, 16, 16)
        assert lowres.shape == (3, 4, 4)
        matches = [(top, left) for top in range(0, 49, 4) for left in range(0, 49, 4)
                   if torch.equal(highres, full_high[:, top:top + 16, left:left + 16])]
        assert len(matches) == 1, "the crop is not an aligned window of the full image"
        top, left = matches[0]
        offsets.add((top, left))
        assert torch.equal(lowres, full_low[:, top // 4:top // 4 + 4, left // 4:left // 4 + 4])
        # The low-resolution crop is the downsample of the high-resolution crop, up to the filter's reach at the border.
        direct = resize(highres[None], (4, 4))[0]
        assert torch.allclose(lowres[:, 1:-1, 1:-1], direct[:, 1:-1, 1:-1], atol=0.15)
        again = make_training_pair(image, spec, torch.Generator().manual_seed(seed))
        assert torch.equal(again[0], highres)
    assert len(offsets) > 3, "crop offsets do not vary with the seed"


def test_crop_spec_rejects_fractional_lowres_crop() -> None:
    with pytest.raises(ValueError, match="not a whole number of pixels"):
        ImageSpec(64, 16, crop=18)


def _keys_per_step(steps: int, batch_size: int, accumulation: int, world_size: int) -> list[list[tuple[int, int]]]:
    per_step = []
    samplers = [StepBatchSampler(10, seed=3, batch_size=batch_size, accumulation=accumulation, rank=rank,
                                 world_size=world_size, total_steps=steps) for rank in range(world_size)]
    for step in range(steps):
        keys = []
        for micro in range(accumulation):
            for sampler in samplers:
                keys += sampler.keys_for(step, micro)
        per_step.append(keys)
    return per_step


def test_batch_order_ignores_how_the_batch_is_split() -> None:
    whole = _keys_per_step(5, 4, 1, 1)
    assert _keys_per_step(5, 2, 2, 1) == whole
    assert _keys_per_step(5, 2, 1, 2) == whole
    assert _keys_per_step(5, 1, 2, 2) == whole
    flat = [index for keys in whole for index, _ in keys]
    assert sorted(flat[:10]) == list(range(10)), "the first epoch does not visit every image once"
    assert sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20], "epochs repeat the same order"


def test_batch_sampler_resumes_mid_run() -> None:
    full = list(StepBatchSampler(7, seed=1, batch_size=3, accumulation=2, total_steps=6))
    resumed = list(StepBatchSampler(7, seed=1, batch_size=3, accumulation=2, start_step=4, total_steps=6))
    assert len(full) == 12
    assert resumed == full[8:]
    other_seed = list(StepBatchSampler(7, seed=2, batch_size=3, accumulation=2, total_steps=6))
    assert other_seed != full


def _write_shards(folder: Path, shards: int, per_shard: int, broken: tuple[str, ...] = ()) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = folder / f"shard-{shard:03d}.tar"
        with webdataset.TarWriter(str(path)) as writer:
            for index in range(per_shard):
                key = f"s{shard}i{index}"
                buffer = io.BytesIO()
                noise_image((16, 16), shard * 100 + index).save(buffer, format="PNG")
                image = b"broken" if key in broken else buffer.getvalue()
                writer.write({"__key__": key, "png": image, "txt": f"caption {key}"})
        paths.append(path)
    return paths


def _epoch_captions(shards: list[Path], rank: int, world_size: int, workers: int, **kwargs) -> list[str]:
    stream = ShardStream(shards, ImageSpec(8), seed=5, rank=rank, world_size=world_size, epochs=1, **kwargs)
    loader = DataLoader(stream, batch_size=1, num_workers=workers, collate_fn=collate_samples)
    return [caption for batch in loader for caption in batch["caption"]]


@pytest.mark.parametrize("shard_count", [2, 5])  # fewer shards than slots (split by sample), and more
def test_shards_split_across_ranks_and_workers(tmp_path: Path, shard_count: int) -> None:
    shards = _write_shards(tmp_path, shard_count, 6)
    everything = {f"caption s{shard}i{index}" for shard in range(shard_count) for index in range(6)}
    per_rank = [_epoch_captions(shards, rank, 2, workers=2, shuffle_buffer=4) for rank in range(2)]
    assert all(per_rank), "a rank received no samples"
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)), "a sample was read by two ranks or workers"
    assert set(seen) == everything


def test_shard_stream_resume_skips_exactly(tmp_path: Path) -> None:
    shards = _write_shards(tmp_path, 3, 5, broken=("s1i2",))
    stream = ShardStream(shards, ImageSpec(8), seed=2, shuffle_buffer=3, batch_size=2)
    full = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_samples)
    batches = []
    for batch in full:
        batches.append(batch["caption"])
        if len(batches) == 12:
            break
    resumed_stream = ShardStream(shards, ImageSpec(8), seed=2, shuffle_buffer=3, batch_size=2, skip_batches=5)
    resumed = DataLoader(resumed_stream, batch_size=2, num_workers=2, collate_fn=collate_samples)
    tail = []
    for batch in resumed:
        tail.append(batch["caption"])
        if len(tail) == 7:
            break
    assert tail == batches[5:]


def test_shard_stream_reports_unusable_samples(tmp_path: Path) -> None:
    shards = _write_shards(tmp_path, 1, 4, broken=("s0i2",))
    items = list(ShardStream(shards, ImageSpec(8), seed=0, epochs=1, shuffle_buffer=1).slot_stream(0, 1))
    assert len(items) == 4, "an unusable sample must still yield one item"
    reports = [entry for item in items for entry in item["skipped"]]
    assert len(reports) == 1
    assert reports[0][0].endswith(":s0i2")
    assert "unreadable image" in reports[0][1]
