"""Benchmarks for imagen: prints one JSON object per run.

    python tools/benchmark.py unet --batch-size 8 --threads 2
    python tools/benchmark.py sampler
    python tools/benchmark.py cascade
    python tools/benchmark.py trainer

Each topic lives in ``tools/bench/<topic>.py`` and defines ``add_arguments(parser)`` and
``run(args) -> dict``. Run one benchmark at a time on an otherwise idle machine: on a
2-core CPU any other load distorts the figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

TOPICS = ("unet", "sampler", "cascade", "trainer")


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="topic", required=True)
    modules = {}
    for topic in TOPICS:
        try:
            modules[topic] = importlib.import_module(f"bench.{topic}")
        except ModuleNotFoundError as error:
            if error.name != f"bench.{topic}":
                raise
            continue
        modules[topic].add_arguments(subparsers.add_parser(topic, help=modules[topic].__doc__))
    args = parser.parse_args(argv)
    result = modules[args.topic].run(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
