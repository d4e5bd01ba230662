"""Reading weights from disk without unpickling untrusted data, and loading CLIP weights into encoders."""
import json
from pathlib import Path
from typing import Dict, Iterable

import torch
from safetensors.torch import load_file
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
    restore_quantization(model, path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not match {type(model).__name__}: {e}") from e
    missing = [k for k in missing if not k.startswith(tuple(fresh))]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match {type(model).__name__}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; expected an open_clip ViT CLIP checkpoint (or a dtpclip one) "
            "of the same size"
        )


def restore_quantization(model: torch.nn.Module, path) -> None:
    """A quantized checkpoint (dtpclip.quantize, or classify with --w-bits) records its quantization in
    the config.json beside it; the quantized modules must exist before its state loads."""
    from dtpclip.encoders.quant import apply_quant_config, quant_config
    from dtpclip.evaluate import CONFIG_FILE

    config = Path(path).parent / CONFIG_FILE
    if not config.is_file():
        return
    quantization = json.loads(config.read_text()).get("quantization")
    if quantization and quant_config(model) is None:
        apply_quant_config(model, quantization)


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
    state = {
        k: v for k, v in checkpoint_filter_fn(state, model).items()
        if not (k.startswith("head.") and (k not in own or own[k].shape != v.shape))
    }
    keep = (*model.fresh_parameter_prefixes, "head.")
    return {**{k: v for k, v in own.items() if k.startswith(keep)}, **state}


def load_encoder_weights(model: torch.nn.Module, path) -> None:
    """Load a CLIP checkpoint from disk into a registry encoder (see `encoder_state_from_clip`)."""
    load_checked(model, encoder_state_from_clip(read_state_dict(path), model), path)
