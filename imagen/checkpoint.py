"""Training checkpoints: ``accelerator.save_state`` folders, written atomically and verified on load.

Layout under ``OUTPUT/checkpoints``::

    step-00000020/                  one complete checkpoint per saved step
        model.safetensors           trained U-Net weights (accelerate)
        optimizer.bin               AdamW state (accelerate)
        scheduler.bin               learning-rate schedule state (accelerate)
        random_states_<rank>.pkl    global RNG state of each process (accelerate)
        custom_checkpoint_0.pkl     EMA weights and update counter
        custom_checkpoint_1.pkl     trainer state: step, seed, batch layout, stage config
        manifest.json               size and SHA-256 of every file above; written last
    .tmp-step-00000025/             a save in progress (removed or replaced by the next save)

All processes write into the temporary folder. After every process has finished, the main
process fsyncs each file, writes the manifest, fsyncs it and renames the folder to its final
name. So a kill at any moment leaves either no new checkpoint or a complete one, and the
previous checkpoints stay intact. Loading verifies the manifest first: a missing, truncated or
altered file raises :class:`CheckpointError` instead of being skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from accelerate import Accelerator

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: missing, incomplete or corrupt."""


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Return ``(step, folder)`` of the finished checkpoints under ``root``, oldest first.

    Temporary folders of interrupted saves are never listed, because their names start with a dot.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """Return the checkpoint with the highest step under ``root``, or None when there is none."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (folders: their entries, so renames survive a power loss)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_manifest(folder: Path, step: int) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync_path(path)
            files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n", encoding="utf-8")
    _fsync_path(manifest)
    _fsync_path(folder)


def save_checkpoint(accelerator: Accelerator, root: str | Path, step: int, keep: Optional[int] = None) -> Path:
    """Save the accelerator state as checkpoint ``step`` under ``root``; keep the newest ``keep``.

    Every process must call this at the same step (it waits for all processes three times).
    Only the main process creates, renames and deletes folders.
    """
    root = Path(root)
    final = checkpoint_path(root, step)
    temporary = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)  # left by a save that was killed
        temporary.mkdir()
    accelerator.wait_for_everyone()

    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _write_manifest(temporary, step)
        if final.exists():
            # Saving a step again after resuming from an earlier checkpoint: swap in the new folder.
            replaced = root / f".old-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
            os.rename(temporary, final)
            shutil.rmtree(replaced)
        else:
            os.rename(temporary, final)
        _fsync_path(root)
        logger.info("saved checkpoint %s", final)
        if keep is not None:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
                logger.info("removed old checkpoint %s (keeping the newest %d)", old, keep)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(folder: str | Path) -> dict:
    """Check every file listed in the manifest (presence, size, SHA-256); return the manifest.

    Raises :class:`CheckpointError` naming the first problem found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r} not found: pass --resume latest or a step-NNNNNNNN folder under OUTPUT/checkpoints")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST_FILE}: it is incomplete or was not written by imagen.train")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt ({error}): resume from an earlier checkpoint") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}: resume from an earlier checkpoint")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt (size or SHA-256 differs from {MANIFEST_FILE}): "
                                  f"resume from an earlier checkpoint")
    return manifest


def load_checkpoint(accelerator: Accelerator, folder: str | Path) -> dict:
    """Verify ``folder`` and restore it into the accelerator (models, optimizer, scheduler, RNG, registered objects).

    Returns the manifest. Every process must call this.
    """
    manifest = verify_checkpoint(folder)
    # NOTE: a process without its own random_states file (more processes than at saving) keeps
    # its current global RNG state, as accelerate only logs that case. The trainer reseeds the
    # global RNG at every step, so training does not depend on it.
    accelerator.load_state(str(folder))
    return manifest
