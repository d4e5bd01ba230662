"""Encoder families, one file each; importing this package imports every module in it, so each
family's `register_family` (and transform's `register_transform`) call runs without being listed here."""
import importlib
import pkgutil

from dtpclip.encoders.dtp import BoundaryPredictor, DTPViT, segment_pool
from dtpclip.encoders.merge import apply_lgtm, apply_tome, bipartite_soft_matching, remove_tome
from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.ptq import apply_ptq, apply_qwt
from dtpclip.encoders.quant import LSQQuantizer, apply_quant_config, quantize_model
from dtpclip.encoders.vit import PlainViT
from dtpclip.encoders.vit_lite import ViTLite
from dtpclip.encoders.vq import FSQuantizer, VQViT

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BoundaryPredictor", "DTPViT", "EncoderOutput", "FSQuantizer", "LSQQuantizer", "PlainViT", "VQViT",
           "ViTLite", "apply_lgtm", "apply_ptq", "apply_quant_config", "apply_qwt", "apply_tome",
           "bipartite_soft_matching", "quantize_model", "remove_tome", "segment_pool"]
