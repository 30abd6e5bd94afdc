"""Shared test fixtures: a tiny random-weight T5 text encoder saved the way real checkpoints are.

Tests run offline: ``HF_HUB_OFFLINE`` is set before any Hugging Face library is imported, so
nothing in the suite can reach the hub, and loading goes through the same ``from_pretrained``
path that real checkpoints take.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from imagen.config import TextEncoderConfig  # noqa: E402

TINY_T5_DIM = 32
TINY_T5_MAX_LENGTH = 32


def tiny_caption_corpus() -> list[str]:
    """Return a few hundred short English captions, enough to train a small sentencepiece vocabulary."""
    subjects = [
        "a red fox", "the old man", "a small robot", "two cats", "a young painter", "the blue bird",
        "an astronaut", "a child", "the tall giraffe", "a golden retriever", "three horses", "a street musician",
    ]
    verbs = [
        "jumps over", "paints", "looks at", "runs past", "sits beside", "draws", "sleeps near", "holds",
        "walks toward", "watches",
    ]
    objects = [
        "a wooden fence", "the city skyline", "a bowl of fruit", "the rising sun", "a snowy mountain",
        "an empty street", "a green umbrella", "the quiet lake",
    ]
    places = [
        "in a forest", "on the beach", "under the bridge", "at night", "during winter", "inside a library",
        "near the harbor", "on a rooftop", "in the rain",
    ]
    styles = ["An oil painting", "A photograph", "A watercolor sketch", "A pencil drawing", "A digital render", "A close-up photo"]
    adjectives = ["quiet", "bright", "misty", "crowded", "ancient", "frozen", "sunny", "gloomy", "colorful"]

    # Every 29th of the 8640 combinations keeps the corpus varied but small (298 scene captions).
    scenes = itertools.product(subjects, verbs, objects, places)
    captions = [f"{s} {v} {o} {p}." for s, v, o, p in itertools.islice(scenes, 0, None, 29)]
    captions = [caption[0].upper() + caption[1:] if i % 2 else caption for i, caption in enumerate(captions)]
    captions += [f"{style} of a {adjective} landscape {place}." for style, adjective, place
                 in itertools.product(styles, adjectives, places[:4])]
    captions += [f"{count} dogs and {count + 1} balloons, 4k, high detail." for count in range(2, 10)]
    return captions


def _train_sentencepiece(folder: Path) -> Path:
    """Train a unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2) and return its path."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_caption_corpus()),
        model_prefix=str(folder / "spiece"),
        model_type="unigram",
        vocab_size=256,
        hard_vocab_limit=False,  # the corpus decides the final size; the T5 config takes it from the tokenizer
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return folder / "spiece.model"


def _build_tiny_t5(folder: Path) -> None:
    """Save a seeded random-weight ``T5EncoderModel`` and its tokenizer into ``folder``."""
    import sentencepiece
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    spiece_path = _train_sentencepiece(folder / "sentencepiece")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spiece_path))
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]

    # transformers 5 builds T5Tokenizer on the `tokenizers` library. Passing the pieces and scores
    # directly skips its sentencepiece-to-tokenizers conversion, which needs protobuf.
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    assert len(tokenizer) == processor.get_piece_size()

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_T5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5EncoderModel(config).eval()

    model_dir = folder / "tiny-t5"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # Real T5 checkpoints ship the sentencepiece model next to tokenizer.json; keep it there too.
    shutil.copyfile(spiece_path, model_dir / "spiece.model")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a random-weight T5 encoder (d_model 32) and its sentencepiece tokenizer.

    It contains ``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json`` and ``spiece.model``, as written by ``save_pretrained``.
    """
    root = tmp_path_factory.mktemp("text_encoder")
    _build_tiny_t5(root)
    return root / "tiny-t5"


@pytest.fixture(scope="session")
def tiny_text_encoder_config(tiny_t5_dir: Path) -> TextEncoderConfig:
    """TextEncoderConfig for ``tiny_t5_dir``: kind "t5", dim 32, max_length 32, float32."""
    return TextEncoderConfig(
        name=str(tiny_t5_dir),
        kind="t5",
        dim=TINY_T5_DIM,
        max_length=TINY_T5_MAX_LENGTH,
        dtype="float32",
    )


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one torch thread.

    On a loaded CPU, waits between threads made some steps of these tiny models over 10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
