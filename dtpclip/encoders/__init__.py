"""Encoder families; importing this package registers every named variant with timm."""
from dtpclip.encoders import dtp, merge, ptq, quant, vit, vit_lite, vq  # noqa: F401  (registration)
from dtpclip.encoders.dtp import BoundaryPredictor, DTPViT, segment_pool
from dtpclip.encoders.merge import apply_lgtm, apply_tome, bipartite_soft_matching, remove_tome
from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.ptq import apply_ptq, apply_qwt
from dtpclip.encoders.quant import LSQQuantizer, apply_quant_config, quantize_model
from dtpclip.encoders.vit import PlainViT
from dtpclip.encoders.vit_lite import ViTLite
from dtpclip.encoders.vq import FSQuantizer, VQViT

__all__ = ["BoundaryPredictor", "DTPViT", "EncoderOutput", "FSQuantizer", "LSQQuantizer", "PlainViT", "VQViT",
           "ViTLite", "apply_lgtm", "apply_ptq", "apply_quant_config", "apply_qwt", "apply_tome",
           "bipartite_soft_matching", "quantize_model", "remove_tome", "segment_pool"]
