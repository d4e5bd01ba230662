"""Encoder families; importing this package registers every named variant with timm."""
from dtpclip.encoders import dtp, merge, vit  # noqa: F401  (registration)
from dtpclip.encoders.dtp import BoundaryPredictor, DTPViT, segment_pool
from dtpclip.encoders.merge import apply_lgtm, apply_tome, bipartite_soft_matching, remove_tome
from dtpclip.encoders.output import EncoderOutput
from dtpclip.encoders.vit import PlainViT

__all__ = ["BoundaryPredictor", "DTPViT", "EncoderOutput", "PlainViT", "apply_lgtm", "apply_tome",
           "bipartite_soft_matching", "remove_tome", "segment_pool"]
