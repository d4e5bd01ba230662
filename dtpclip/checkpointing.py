"""Resumable training checkpoints: written atomically, read without unpickling.

A checkpoint is a directory `step_{N:08d}/` under `<run>/checkpoints/`:
  model.safetensors   the CLIP's weights (open_clip layout with our timm tower)
  config.json         the run's config (and the open_clip model name, under "model")
  trainer.pt          optimizer, scheduler, step and data position (tensors and plain values)
  rng_{rank}.pt       each rank's torch / numpy / python RNG states
It is built in a `.tmp` directory and renamed into place, then `<run>/latest` (a text file holding
its path relative to the run) is replaced; a crash at any moment leaves the previous checkpoint
intact.
Everything is read with `torch.load(weights_only=True)` or safetensors.
"""
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file

from dtpclip.checkpoint import read_state_dict

LATEST = "latest"


def rng_state() -> dict:
    """This process's RNG states in a weights_only-loadable form."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def staging_dir(run_dir, step: int) -> Path:
    """Where every rank writes its part of checkpoint `step` before rank 0 publishes it."""
    path = checkpoint_dir(run_dir, step).with_suffix(".tmp")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_rank_part(run_dir, step: int, rank: int) -> None:
    torch.save(rng_state(), staging_dir(run_dir, step) / f"rng_{rank}.pt")


def write_main_part(run_dir, step: int, model_state: dict, trainer_state: dict, config: dict) -> None:
    staging = staging_dir(run_dir, step)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(staging / "model.safetensors"))
    torch.save(trainer_state, staging / "trainer.pt")
    (staging / "config.json").write_text(json.dumps(config, indent=1))


def publish(run_dir, step: int, keep: int = 2) -> Path:
    """Rename the staged checkpoint into place, point `latest` at it, drop all but the last `keep`."""
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging_dir(run_dir, step), final)
    pointer = Path(run_dir) / (LATEST + ".tmp")
    pointer.write_text(str(final.relative_to(run_dir)))
    os.replace(pointer, Path(run_dir) / LATEST)
    for old in sorted(final.parent.glob("step_*"))[:-keep]:
        if old.is_dir() and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Optional[Path]:
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_resume(resume: Optional[str], run_dir) -> Optional[Path]:
    """'auto': the run's latest checkpoint, if any; a path: that checkpoint (an error if absent)."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / LATEST).is_file():
        path = latest_checkpoint(path) or path
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"--resume {resume!r}: expected a checkpoint directory with trainer.pt "
                                "(…/checkpoints/step_N) or a run directory holding one")
    return path


def read_checkpoint(path: Path, rank: int) -> dict:
    """Model weights, trainer state and this rank's RNG states of a published checkpoint."""
    rng_file = path / f"rng_{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no RNG state for rank {rank}: it was written by fewer "
                                "processes; resume with the same number of processes")
    return {
        "model": read_state_dict(path / "model.safetensors"),
        "trainer": torch.load(path / "trainer.pt", weights_only=True),
        "rng": torch.load(rng_file, weights_only=True),
    }
