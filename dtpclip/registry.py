"""The registry: model sizes, registered encoders and training-free transforms, as tables.

The bottom layer: of dtpclip it imports only the pure-text `specs`. Every encoder is a timm model (so
`timm.create_model` builds it); a family declares its variants with one `register_family` call in
its own file under `dtpclip/encoders/`, and a training-free transform (ToMe, PTQ, ...) with one
`register_transform` call. A size is one row of `SIZES`: every family is built at every size.
"""
import difflib
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import timm
import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from dtpclip.specs import parse_kwargs


@dataclass(frozen=True)
class Size:
    """One model size: what any family needs to build at it.

    vit:        timm VisionTransformer kwargs (a family's constructor may add its own defaults).
    tag:        its open_clip spelling ('B-32' in 'DTP-ViT-B-32-10x').
    text_tower: the CLIP's text tower and joint width: an open_clip architecture name whose
                text tower the CLIP reuses, or {'embed_dim', 'text_cfg'}; None: no CLIP at this size.
    merge_r:    r of the named ToMe / LGTM variants (a sweep reaches any other r).
    pretrained_cfg: timm pretrained-config entries that differ from the CLIP defaults.
    """

    name: str
    tag: str
    vit: dict
    text_tower: Union[str, dict, None] = None
    merge_r: Tuple[int, ...] = ()
    pretrained_cfg: dict = field(default_factory=dict)

    @property
    def img_size(self) -> int:
        return self.vit["img_size"]

    def default_cfg(self) -> dict:
        """timm pretrained config (data): input size and normalisation, no hub weights."""
        return {**dict(url="", num_classes=0, input_size=(3, self.img_size, self.img_size), pool_size=None,
                       crop_pct=1.0, interpolation="bicubic", fixed_input_size=True, mean=OPENAI_CLIP_MEAN,
                       std=OPENAI_CLIP_STD, first_conv="patch_embed.proj", classifier="head"),
                **self.pretrained_cfg}


_VIT_TI_224 = dict(img_size=224, embed_dim=192, depth=12, num_heads=3)
_TINY_TEXT = dict(context_length=24, vocab_size=49408, width=128, heads=4, layers=2)
# The two 64x64 sizes are ours (Design decisions in README.md): Ti-16-64 is the demo's, Ti-8-64 the
# tests'. The 224 sizes with a text tower are the CLIPs of open_clip's architectures of that name.
SIZES: Dict[str, Size] = {s.name: s for s in (
    Size("tiny_patch16_64", "Ti-16-64",
         dict(img_size=64, patch_size=16, embed_dim=128, depth=6, num_heads=4, global_pool="token"),
         {"embed_dim": 128, "text_cfg": {**_TINY_TEXT, "context_length": 16, "layers": 1}}, merge_r=(1, 2)),
    Size("tiny_patch8_64", "Ti-8-64",
         dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4, global_pool="avg"),
         {"embed_dim": 128, "text_cfg": _TINY_TEXT}, merge_r=(4, 8)),
    Size("tiny_patch16_224", "Ti-16", {**_VIT_TI_224, "patch_size": 16}),
    Size("tiny_patch32_224", "Ti-32", {**_VIT_TI_224, "patch_size": 32}),
    Size("small_patch16_224", "S-16", dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
         "ViT-S-16", merge_r=(13,)),
    Size("small_patch32_224", "S-32", dict(img_size=224, patch_size=32, embed_dim=384, depth=12, num_heads=6)),
    Size("base_patch32_224", "B-32", dict(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12),
         "ViT-B-32", merge_r=(2, 3)),
    Size("base_patch16_224", "B-16", dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
         "ViT-B-16", merge_r=(8, 13, 16)),
    Size("large_patch14_224", "L-14", dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
         "ViT-L-14", merge_r=(8,)),
)}


@dataclass(frozen=True)
class EncoderInfo:
    """A registered encoder: its name, family, size and open_clip name (None without a CLIP).

    Everything else (compression, bits, r, ...) is read off the model itself (`settings`).
    """

    name: str
    family: str
    size: Size
    clip_name: Optional[str] = None

    def settings(self, **model_kwargs) -> dict:
        """The built model's own `settings()` (its efficiency knobs), built on the meta device (no memory);
        the registered default is built once, other kwargs (which may be lists) each time."""
        return dict(_default_settings(self.name)) if not model_kwargs else _settings(self.name, model_kwargs)

    @property
    def compression(self) -> Optional[float]:
        return self.settings().get("compression")


def _settings(name: str, model_kwargs: dict) -> dict:
    with torch.device("meta"):
        model = timm.create_model(name, **model_kwargs)
    return model.settings() if hasattr(model, "settings") else {}


@functools.lru_cache(maxsize=None)
def _default_settings(name: str) -> dict:
    return _settings(name, {})


_ENCODERS: Dict[str, EncoderInfo] = {}
_LISTENERS: List[Callable[[EncoderInfo], None]] = []


def on_register(listener: Callable[[EncoderInfo], None]) -> None:
    """Call `listener` with every registered encoder, those already known and those to come
    (how `dtpclip.clip` makes each one an open_clip architecture without the registry importing it)."""
    _LISTENERS.append(listener)
    for info in list(_ENCODERS.values()):
        listener(info)

Variants = Union[Mapping[str, dict], Callable[[Size], Mapping[str, dict]]]


def register_family(family: str, model_cls: Callable, name: str, clip_name: Optional[str] = None,
                    variants: Variants = None, sizes: Optional[Iterable[Size]] = None,
                    pretrained_filter_fn: Optional[Callable] = None,
                    feature_cfg: Optional[dict] = None) -> List[EncoderInfo]:
    """Register a family's variants with timm (and, through `dtpclip.clip`, with open_clip); one call per family.

    model_cls: a timm VisionTransformer subclass (or any callable taking its kwargs) that keeps the
        encoder contract. name / clip_name: templates with {size} and {tag}; a variant key other
        than '' is appended ('_' + key to the name, '-' + key to the open_clip name).
    variants: {key: constructor kwargs} (default {'': {}}), or a function of the size giving them.
    sizes: default every row of SIZES. pretrained_filter_fn, feature_cfg: timm's (loading weights from
    disk; `features_only=True`).
    The kwargs of a build are the size's, then the variant's, then the caller's (which may change the
    size's but not contradict the variant's: 'dtp_vit_{size}_4x' with compression=0.2 is an error).
    """
    infos = []
    for size in SIZES.values() if sizes is None else sizes:
        size_variants = variants(size) if callable(variants) else (variants or {"": {}})
        for key, preset in size_variants.items():
            variant = name.format(size=size.name, tag=size.tag) + (f"_{key}" if key else "")
            has_clip = clip_name is not None and size.text_tower is not None
            info = EncoderInfo(variant, family, size,
                               clip_name.format(size=size.name, tag=size.tag) + (f"-{key}" if key else "")
                               if has_clip else None)
            _register_timm(info, model_cls, {**size.vit, **preset}, preset, pretrained_filter_fn, feature_cfg)
            infos.append(info)
    return infos


def _register_timm(info: EncoderInfo, model_cls: Callable, preset: dict, variant: dict,
                   filter_fn: Optional[Callable], feature_cfg: Optional[dict]) -> None:
    def entrypoint(pretrained: bool = False, **kwargs):
        clash = {k: v for k, v in kwargs.items() if k in variant and v != variant[k]}
        if clash:  # a named variant is its setting: another value is another name
            base = info.name.rsplit("_", 1)[0]
            hint = f"build {base} with {clash}" if base in _ENCODERS else "choose the variant of that setting"
            raise ValueError(f"{info.name} is the variant {variant}; {clash} contradicts it: {hint}")
        return build_model_with_cfg(model_cls, info.name, pretrained, pretrained_filter_fn=filter_fn,
                                    feature_cfg=dict(feature_cfg or {}), **{**preset, **kwargs})  # timm edits it

    entrypoint.__name__ = entrypoint.__qualname__ = info.name
    entrypoint.__module__ = getattr(model_cls, "__module__", __name__)
    # timm reads a module's `default_cfgs` when it registers an entrypoint: give it this one's
    cfgs = generate_default_cfgs({info.name: info.size.default_cfg()})
    module = __import__(entrypoint.__module__, fromlist=["_"])
    module.default_cfgs = {**getattr(module, "default_cfgs", {}), **cfgs}
    register_model(entrypoint)
    _ENCODERS[info.name] = info
    for listener in _LISTENERS:
        listener(info)


def list_encoders(family: Optional[str] = None) -> List[EncoderInfo]:
    """Registered encoders (optionally of one family), sorted by name."""
    return sorted((i for i in _ENCODERS.values() if family in (None, i.family)), key=lambda i: i.name)


def encoder_info(name: str) -> EncoderInfo:
    """A registered encoder by its timm or open_clip name; a clear error for unknown names."""
    for info in _ENCODERS.values():
        if name in (info.name, info.clip_name):
            return info
    raise KeyError(f"unknown encoder {name!r}{did_you_mean(name, known_names())}; dtpclip.list_encoders() lists "
                   f"all {len(_ENCODERS)}")


def known_names() -> List[str]:
    """Every registered timm name and open_clip name."""
    return sorted({n for i in _ENCODERS.values() for n in (i.name, i.clip_name) if n})


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """'; did you mean X or Y?' for the close candidates, '' when none is close."""
    close = difflib.get_close_matches(str(name), list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


# ---------------------------------------------------------------------------------------------
# training-free transforms, named by one spec string everywhere: 'tome:r=8', 'ptq:w=4,a=4,qwt=true'

@dataclass(frozen=True)
class TransformInfo:
    """A training-free transform: `apply(model, calibration, **params)` patches `model`'s encoder in place.

    params: its parameters and their defaults (the spec's keys; REQUIRED: no default).
    applies_to(encoder): whether it can patch that encoder (else `apply` raises a clear error).
    calibration: whether it needs calibration image batches (a list of tensors).
    example: a spec that applies it (README, tests).
    """

    name: str
    apply: Callable
    params: Dict[str, object]
    applies_to: Callable[[object], bool]
    calibration: bool = False
    example: str = ""
    summary: str = ""
    title: str = ""  # its name in figures and tables ('ToMe')


_TRANSFORMS: Dict[str, TransformInfo] = {}


def register_transform(name: str, apply: Callable, params: Dict[str, object], applies_to: Callable[[object], bool],
                       calibration: bool = False, example: str = "", summary: str = "", title: str = "") -> TransformInfo:
    """Make a training-free transform known to every pipeline's `--transform` (one call per transform)."""
    _TRANSFORMS[name] = TransformInfo(name, apply, dict(params), applies_to, calibration, example or name, summary,
                                      title or name)
    return _TRANSFORMS[name]


def list_transforms() -> List[TransformInfo]:
    return sorted(_TRANSFORMS.values(), key=lambda t: t.name)


@dataclass(frozen=True)
class TransformSpec:
    """A parsed transform spec: the transform and its parameters (defaults filled in)."""

    name: str
    params: Dict[str, object]

    def __str__(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.params.items()) if self.params else "")


def parse_transform(spec: Union[str, dict, TransformSpec]) -> TransformSpec:
    """'lgtm:r=8,dense_layers=2' (or {'name': 'lgtm', 'r': 8}) -> TransformSpec; errors name the spec."""
    if isinstance(spec, TransformSpec):
        return spec
    if isinstance(spec, dict):
        name, given = spec.get("name"), {k: v for k, v in spec.items() if k != "name"}
    else:
        name, _, body = str(spec).partition(":")
        parts = re.split(r",(?![^\[(]*[\])])", body)  # commas inside [..] or (..) belong to a value
        given = parse_kwargs([p for p in parts if p], f"transform {spec!r}")
    info = _TRANSFORMS.get(name)
    if info is None:
        raise ValueError(f"unknown transform {name!r} in {spec!r}; known: {', '.join(sorted(_TRANSFORMS))}")
    unknown = sorted(set(given) - set(info.params))
    if unknown:
        raise ValueError(f"transform {spec!r}: unknown parameter(s) {unknown}; {name} takes {sorted(info.params)}")
    missing = [k for k, v in info.params.items() if v is REQUIRED and k not in given]
    if missing:
        raise ValueError(f"transform {spec!r}: missing {missing} (e.g. {name}:{missing[0]}=...)")
    return TransformSpec(name, {**{k: v for k, v in info.params.items() if v is not REQUIRED}, **given})


def transform_info(name: str) -> TransformInfo:
    return _TRANSFORMS[name]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # a transform parameter without a default
