"""Resumable training checkpoints: written atomically, read without unpickling.

A checkpoint is a directory `step_{N:08d}/` under `<run>/checkpoints/`:
  model.safetensors   the CLIP's weights (open_clip layout with our timm tower)
  config.json         the run's config (and the open_clip model name, under "model")
  trainer.pt          optimizer, scheduler, step and data position (tensors and plain values)
  rng_{rank}.pt       each rank's torch / numpy / python RNG states
It is built in a `.tmp` directory and renamed into place, then `<run>/latest` (a text file holding
its path relative to the run) is replaced; a crash at any moment leaves the previous checkpoint
intact. Older checkpoints are pruned before a new one is staged, so a run needs room for `keep`
of them; a failed write (a full disk) removes its staging directory and says which checkpoint is
intact. Resuming falls back to the previous checkpoint when the newest cannot be read.
Everything is read with `torch.load(weights_only=True)` or safetensors.
"""
import contextlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from dtpclip.checkpoint import read_state_dict

LATEST = "latest"
KEEP = 2  # published checkpoints a run keeps

log = logging.getLogger(__name__)


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


LATEST_RUN = "latest_run"  # in the runs root: the directory of the newest run started there


def runs_root() -> Path:
    """Where runs go by default: $DTPCLIP_RUNS_DIR, else ~/.cache/dtpclip/runs."""
    return Path(os.environ.get("DTPCLIP_RUNS_DIR") or Path.home() / ".cache" / "dtpclip" / "runs")


def run_name(label: str) -> str:
    """A new run's default name, as open_clip's logs/<name>: its model and the time (a count added when two
    start in the same second), e.g. DTP-ViT-Ti-16-64-4x-20261130-054935."""
    name = base = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    count = 1
    while (runs_root() / name).exists():
        name, count = f"{base}-{count}", count + 1
    return name


def mark_latest_run(run_dir) -> None:
    """Record `run_dir` as the runs root's newest run, which the evaluators find with no arguments."""
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    pointer = root / (LATEST_RUN + ".tmp")
    pointer.write_text(str(Path(run_dir).resolve()))
    os.replace(pointer, root / LATEST_RUN)


def latest_run() -> Optional[Path]:
    pointer = runs_root() / LATEST_RUN
    return Path(pointer.read_text().strip()) if pointer.is_file() else None


def check_same_run(run_dir, record: dict, keys: Tuple[str, ...]) -> None:
    """Before resuming `run_dir`: its saved config must agree with this run's on `keys` (the model, its
    kwargs, the data), else a resume would continue another experiment under this one's name."""
    latest = latest_checkpoint(run_dir)
    if latest is None or not (latest / "config.json").is_file():
        return
    saved = json.loads((latest / "config.json").read_text())
    differ = {k: (saved.get(k), record.get(k)) for k in keys if k in saved and saved.get(k) != record.get(k)}
    if differ:
        changes = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise FileExistsError(f"run directory {str(run_dir)!r} holds another run ({changes}): pass a new --name or "
                              "--run-dir for this one, or the same settings to resume it")


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def staging_dir(run_dir, step: int) -> Path:
    """Where every rank writes its part of checkpoint `step` before rank 0 publishes it."""
    path = checkpoint_dir(run_dir, step).with_suffix(".tmp")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _staging_write(run_dir, step: int):
    """Writes into checkpoint `step`'s staging directory; a failure removes it and names what is intact."""
    try:
        yield staging_dir(run_dir, step)
    except OSError as e:
        shutil.rmtree(checkpoint_dir(run_dir, step).with_suffix(".tmp"), ignore_errors=True)
        intact = latest_checkpoint(run_dir)
        raise OSError(f"could not write checkpoint step {step} under {str(run_dir)!r}: {e.strerror or e}. "
                      f"{f'The previous checkpoint {str(intact)!r} is intact' if intact else 'No checkpoint was kept'}"
                      "; free space (or fix the directory) and rerun with --resume auto") from e


def write_rank_part(run_dir, step: int, rank: int) -> None:
    with _staging_write(run_dir, step) as staging:
        torch.save(rng_state(), staging / f"rng_{rank}.pt")


def write_main_part(run_dir, step: int, model_state: dict, trainer_state: dict, config: dict) -> None:
    with _staging_write(run_dir, step) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()},
                  str(staging / "model.safetensors"))
        torch.save(trainer_state, staging / "trainer.pt")
        (staging / "config.json").write_text(json.dumps(config, indent=1))


def published(run_dir) -> List[Path]:
    """The run's published checkpoint directories, oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir() and p.suffix != ".tmp")


def make_room(run_dir, step: int, keep: int = KEEP) -> None:
    """Before staging checkpoint `step`: drop all but the newest `keep - 1` others (one replaced in place at
    the same step does not count, so an older one stays intact meanwhile), and stale staging directories."""
    others = [p for p in published(run_dir) if p != checkpoint_dir(run_dir, step)]
    for old in others[: max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / "checkpoints").glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(run_dir, step: int) -> Path:
    """Rename the staged checkpoint into place and point `latest` at it."""
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging_dir(run_dir, step), final)
    pointer = Path(run_dir) / (LATEST + ".tmp")
    pointer.write_text(str(final.relative_to(run_dir)))
    os.replace(pointer, Path(run_dir) / LATEST)
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


def holds_run(run_dir) -> bool:
    """Whether `run_dir` already holds a run's checkpoints or metrics."""
    return (Path(run_dir) / LATEST).exists() or bool(published(run_dir)) or (Path(run_dir) / "metrics.jsonl").exists()


def _load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises several kinds; re-raised with the file named
        raise ValueError(f"could not read {str(file)!r} ({type(e).__name__}: {e})") from e


def read_checkpoint(path: Path, rank: int) -> dict:
    """Model weights, trainer state and this rank's RNG states of a published checkpoint."""
    rng_file = path / f"rng_{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no RNG state for rank {rank}: it was written by fewer "
                                "processes; resume with the same number of processes")
    return {"model": read_state_dict(path / "model.safetensors"), "trainer": _load(path / "trainer.pt"),
            "rng": _load(rng_file)}


def load_resume(resume: Optional[str], run_dir, rank: int) -> Optional[Tuple[Path, dict]]:
    """(checkpoint, its contents) to resume from, or None to start fresh (see `resolve_resume`).

    With 'auto', a checkpoint that cannot be read is skipped for the previous one, with a warning.
    """
    path = resolve_resume(resume, run_dir)
    if path is None:
        return None
    candidates = [path] + ([p for p in reversed(published(run_dir)) if p != path] if resume == "auto" else [])
    for i, candidate in enumerate(candidates):
        try:
            return candidate, read_checkpoint(candidate, rank)
        except (OSError, ValueError) as e:
            if i + 1 == len(candidates):
                raise ValueError(f"cannot resume from {str(candidate)!r}: {e}") from e
            log.warning("checkpoint %s cannot be read (%s); resuming from the previous one, %s",
                        candidate, e, candidates[i + 1])
    return None


def trim_metrics(path, step: int) -> None:
    """Drop the records of metrics.jsonl past `step`: a resume from there writes them again."""
    path = Path(path)
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
