"""Checkpoint I/O: reading weights without unpickling untrusted data, finding a checkpoint's files and
config, loading CLIP weights into encoders. Imports nothing of dtpclip.

A dtpclip checkpoint directory holds `model.safetensors` and `config.json`: {"model": <open_clip or
registry name>, "model_kwargs": {...}, "transforms": [spec, ...], "quantization": {...}, ...}; a run
directory's `latest` names its newest checkpoint directory.
"""
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch checkpoint loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected a .safetensors or .pt/.bin file)")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- re-raised with the file named
        raise ValueError(
            f"could not read checkpoint {str(path)!r}: expected safetensors or a weights-only torch "
            f"state dict ({type(e).__name__}: {e})"
        ) from e
    state = state.get("state_dict", state)  # open_clip_train's checkpoints wrap it
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checked(model: torch.nn.Module, state: Dict[str, torch.Tensor], path, fresh: Iterable[str] = ()) -> None:
    """Load `state` into `model`; only keys under the `fresh` prefixes may be missing. Errors name `path`."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not match {type(model).__name__}: {e}") from e
    fresh_missing = [k for k in missing if k.startswith(tuple(fresh))]
    if fresh_missing:
        warn_fresh(fresh_missing, fresh, f"checkpoint {str(path)!r}")
    missing = [k for k in missing if not k.startswith(tuple(fresh))]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match {type(model).__name__}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; expected an open_clip ViT CLIP checkpoint (or a dtpclip one) "
            "of the same size"
        )


def warn_fresh(keys, prefixes: Iterable[str], source: str) -> None:
    """Say that parameters a checkpoint lacks keep their fresh initialisation (right when a DTP-ViT starts
    from a plain CLIP, wrong when evaluating a trained one)."""
    prefixes = sorted(p + "*" for p in prefixes if any(k.startswith(p) for k in keys))
    warnings.warn(f"{source} holds no {', '.join(prefixes[:3])}{' ...' if len(prefixes) > 3 else ''} "
                  f"({len(keys)} tensors): they keep their fresh initialisation. Expected when starting from a "
                  "plain CLIP; if this is a trained model of this kind, the checkpoint is of another model",
                  stacklevel=3)


def _few(keys, n: int = 6) -> str:
    return str(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def encoder_state_from_clip(state: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A CLIP checkpoint (open_clip's own ViT, an open_clip CLIP with a timm tower, or a bare encoder
    state dict) in a registry encoder's layout, converted by timm's own filter.

    The CLIP projection (open_clip's `visual.proj`) belongs to the CLIP wrapper, so it is dropped
    unless the encoder has a head of exactly that shape. Parameters a CLIP cannot hold (e.g. DTP's
    boundary predictor, `model.fresh_parameter_prefixes`) and a classifier head keep the model's
    own initialisation. Also timm's `pretrained_filter_fn`, so timm's file loading agrees.
    """
    own = model.state_dict()
    # timm's filter reshapes every key holding 'patch_embed.proj.weight' as the conv kernel, so a quantized patch
    # embedding's quantizer state goes around it (with the CLIP trunk's prefix dropped, as the filter drops it).
    around = [k for k in state if "patch_embed.proj.weight_quant." in k]
    quantizer = {k.removeprefix("visual.trunk."): state[k] for k in around}
    state = {
        k: v for k, v in checkpoint_filter_fn({k: v for k, v in state.items() if k not in around}, model).items()
        if not (k.startswith("head.") and (k not in own or own[k].shape != v.shape))
    }
    state.update(quantizer)
    fresh = [k for k in own if k.startswith(tuple(model.fresh_parameter_prefixes)) and k not in state]
    if fresh:
        warn_fresh(fresh, model.fresh_parameter_prefixes, "the CLIP checkpoint")
    keep = (*model.fresh_parameter_prefixes, "head.")
    return {**{k: v for k, v in own.items() if k.startswith(keep)}, **state}


def load_encoder_weights(model: torch.nn.Module, path) -> None:
    """Load a CLIP checkpoint from disk into a registry encoder (see `encoder_state_from_clip`)."""
    load_checked(model, encoder_state_from_clip(read_state_dict(path), model), path)


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
WEIGHTS_FILE = "model.safetensors"  # in a dtpclip checkpoint directory, beside CONFIG_FILE
CONFIG_FILE = "config.json"
LATEST = "latest"  # in a run directory: the newest checkpoint directory (symlink, or a file naming it)


def _follow_latest(run_dir: Path) -> Path:
    pointer = run_dir / LATEST
    if pointer.is_dir():  # a symlink to the checkpoint directory
        return pointer.resolve()
    target = Path(pointer.read_text().strip()).expanduser()
    return target if target.is_absolute() else run_dir / target


def resolve_checkpoint(path) -> Tuple[Path, Optional[str]]:
    """(weights file, model name or None) of a checkpoint given as any of

    - an open_clip / dtpclip checkpoint file (.safetensors, .pt, .pth, .bin); its model name comes
      from a `config.json` beside it when there is one, else None (then `--model` must say it);
    - a dtpclip checkpoint directory: `model.safetensors` + `config.json`;
    - a run directory whose `latest` (a symlink, or a file holding the directory's path, relative to
      the run directory or absolute) points to such a checkpoint directory.
    """
    given = path
    path = Path(path).expanduser()
    if path.is_dir() and (path / LATEST).exists():
        path = _follow_latest(path)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"checkpoint directory {str(given)!r} has no {WEIGHTS_FILE} (expected a dtpclip checkpoint "
                f"directory with {WEIGHTS_FILE} + {CONFIG_FILE}, a run directory with '{LATEST}', or a "
                f"checkpoint file {'/'.join(CHECKPOINT_SUFFIXES)})")
    elif path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"checkpoint {str(given)!r} is not a checkpoint file: expected one of "
                             f"{', '.join(CHECKPOINT_SUFFIXES)} or a checkpoint directory")
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint {str(given)!r} does not exist (expected a checkpoint file "
                                f"{'/'.join(CHECKPOINT_SUFFIXES)} or a checkpoint directory)")
    return weights, checkpoint_config(weights).get("model")


def checkpoint_config(weights) -> dict:
    """The `config.json` beside a weights file ({} when there is none)."""
    config = Path(weights).parent / CONFIG_FILE
    if not config.is_file():
        return {}
    try:
        values = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint config {str(config)!r} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"checkpoint config {str(config)!r} must hold a JSON object with a 'model' key")
    return values


def write_json(path, result: dict) -> None:
    """Write `result` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint_dir(model: torch.nn.Module, out_dir, config: dict) -> Path:
    """model.safetensors + config.json in `out_dir`: a dtpclip checkpoint directory every CLI loads.
    A directory that already holds a checkpoint is refused: no run overwrites another's files."""
    out = Path(out_dir).expanduser()
    if (out / WEIGHTS_FILE).exists() or (out / CONFIG_FILE).exists():
        raise FileExistsError(f"{str(out)!r} already holds a checkpoint ({WEIGHTS_FILE} / {CONFIG_FILE}); "
                              "choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    write_json(out / CONFIG_FILE, config)
    return out
