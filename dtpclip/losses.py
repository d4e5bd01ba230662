"""Distillation losses and a teacher wrapper that returns them as named terms (open_clip style).

Logit KD (Hinton et al. 2015), decoupled KD (Zhao et al. 2022, "Decoupled Knowledge Distillation";
reference: megvii-research/mdistiller, `dkd.py`), and feature KD: cosine summed over features
(VQ-ViT's `--FLfn cos --featureloss-reduction sum`) and MSE (the ViT-Lite quantization study's logits +
embedding KD chains), over every block's output, the last embedding only (the study's better variant), or
two features per block (after attention and after the MLP, our reading of VQ-ViT's two per block).
"""
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtpclip.encoders.output import EncoderOutput
from dtpclip.specs import FEATURE_LAYERS, FEATURE_LOSSES, LOGIT_LOSSES



def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes at `temperature`, times T^2, averaged over the batch."""
    T = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / T, -1), F.log_softmax(teacher_logits.float() / T, -1),
                    reduction="batchmean", log_target=True) * T * T


def clip_distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CLIP KD: logit KD on the in-batch image->text and text->image similarities of a frozen teacher CLIP.

    The student's features are normalised; `teacher_logits` [B, B] are the teacher's image->text logits of the
    same batch (its own towers and logit scale). Both directions averaged (as the symmetric CLIP loss); the
    batch is this process's.
    """
    student_logits = logit_scale * image_features @ text_features.T
    return (kd_loss(student_logits, teacher_logits, temperature)
            + kd_loss(student_logits.T, teacher_logits.T, temperature)) / 2


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; 0 * log 0 terms count as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD) [B], not yet scaled by T^2.

    TCKD: KL of the binary (target, all others) probabilities; NCKD: KL of the probabilities among
    the non-target classes. Classical KD = TCKD + (1 - p_target of the teacher) * NCKD (DKD, eq. 5).
    """
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"DKD target must be class indices of shape {tuple(student_logits.shape[:1])}, "
                         f"got {tuple(target.shape)}")
    T = temperature
    log_s, log_t = F.log_softmax(student_logits.float() / T, -1), F.log_softmax(teacher_logits.float() / T, -1)
    is_target = F.one_hot(target, student_logits.shape[-1]).bool()

    def binary(log_p):  # log [p_target, 1 - p_target], the second as a logsumexp over the others
        return torch.stack([log_p[is_target], log_p.masked_fill(is_target, float("-inf")).logsumexp(-1)], -1)

    def others(log_p):  # log-softmax over the non-target classes
        return F.log_softmax(log_p.masked_fill(is_target, float("-inf")), -1)

    return _kl_rows(binary(log_t), binary(log_s)), _kl_rows(others(log_t), others(log_s))


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """DKD = (alpha * TCKD + beta * NCKD) * T^2, averaged over the batch (defaults: the paper's ImageNet)."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return (alpha * tckd + beta * nckd).mean() * temperature ** 2


def _check_pairs(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature KD needs the same, non-zero number of student and teacher features, "
                         f"got {len(student)} and {len(teacher)} (matching block counts)")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"feature KD: student feature {i} has shape {tuple(s.shape)}, the teacher's "
                             f"{tuple(t.shape)}; expected equal widths and token counts")


def cosine_feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over features (blocks) of the mean over tokens of 1 - cos(student, teacher)."""
    _check_pairs(student, teacher)
    return sum((1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for s, t in zip(student, teacher))


def mse_feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over features (blocks) of their mean squared error."""
    _check_pairs(student, teacher)
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher))


@contextmanager
def block_outputs(model: nn.Module, layers: str = "blocks") -> Iterator[List[torch.Tensor]]:
    """Collect features during the forward passes inside the context (FEATURE_LAYERS): 'blocks' every
    `model.blocks[i]` output; 'last' the head's input (the pre-logits embedding); 'attn_and_block' per block
    the residual stream after attention (the input of norm2, in timm's and ViT-Lite's blocks) and its output."""
    if layers not in FEATURE_LAYERS:
        raise ValueError(f"unknown feature layers {layers!r}: expected one of {', '.join(FEATURE_LAYERS)}")
    outputs: List[torch.Tensor] = []
    if layers == "last":
        hooks = [model.get_classifier().register_forward_pre_hook(lambda m, args: outputs.append(args[0]))]
    else:
        hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.blocks]
    if layers == "attn_and_block":
        hooks += [block.norm2.register_forward_pre_hook(lambda m, args: outputs.append(args[0]))
                  for block in model.blocks]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def load_teacher(teacher: Union[str, nn.Module, None], checkpoint=None, num_classes: Optional[int] = None) -> nn.Module:
    """A frozen teacher: a module as it is, or a registry model (registry or open_clip name; None: the name
    in the checkpoint's config.json).

    `checkpoint`: a weights file, dtpclip checkpoint directory or run directory (`resolve_checkpoint`);
    a quantized one (dtpclip.quantize, QAT) comes back quantized. With `num_classes` the teacher is a
    classifier and the checkpoint must hold its head; without, it is any CLIP or encoder checkpoint.
    """
    if isinstance(teacher, nn.Module):
        return teacher.eval().requires_grad_(False)
    from dtpclip.checkpoint import checkpoint_config, load_checked, read_state_dict, resolve_checkpoint
    from dtpclip.evaluate import model_name, registry_name
    from dtpclip.factory import create_encoder, restore_structure

    weights, saved_name = resolve_checkpoint(checkpoint) if checkpoint is not None else (None, None)
    name = registry_name(model_name(teacher, saved_name, checkpoint))
    config = checkpoint_config(weights) if weights is not None else {}
    model_kwargs = config.get("model_kwargs", {})
    if num_classes is None:
        model = create_encoder(name, checkpoint=weights, **model_kwargs)
    else:
        model = create_encoder(name, num_classes=num_classes, **model_kwargs)
        if weights is not None:
            restore_structure(model, config)
            state = read_state_dict(weights)
            if "head.weight" not in state:
                raise ValueError(f"teacher checkpoint {str(checkpoint)!r} has no classifier head (head.weight); "
                                 "expected a classifier's state (encoder + head), e.g. one trained by dtpclip.classify")
            load_checked(model, state, weights)
    return model.eval().requires_grad_(False)


class Distiller(nn.Module):
    """A frozen teacher (run under no_grad, in eval mode) and the distillation terms against it.

    logit: 'logit' (KD) or 'dkd' (alpha, beta), at `temperature`, weighted by `weight`; None: off.
    feature: 'cos' or 'mse' over the `feature_layers` features (`block_outputs`), weighted by `feature_weight`.
    token_loss: the student encoder's `token_distill_loss(out, teacher_tokens)` (DynamicViT's), added as
    'token_loss' when the student's encoder output is passed; the teacher is then run through the encoder
    contract (`encode` and its classifier) to give its tokens too.
    The teacher's logits are `teacher(images)`; a teacher whose forward is not its classifier
    (a CLIP tower) can be wrapped in a module that returns the logits to distil.
    """

    def __init__(self, teacher: nn.Module, logit: Optional[str] = "dkd", weight: float = 1.0, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0, feature: Optional[str] = None,
                 feature_weight: float = 1.0, feature_layers: str = "blocks",
                 token_loss: Optional[Callable[[EncoderOutput, torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        if logit not in (None, *LOGIT_LOSSES):
            raise ValueError(f"unknown logit distillation {logit!r}: expected one of {', '.join(LOGIT_LOSSES)}")
        if feature not in (None, *FEATURE_LOSSES):
            raise ValueError(f"unknown feature distillation {feature!r}: expected one of {', '.join(FEATURE_LOSSES)}")
        if logit is None and feature is None:
            raise ValueError("a Distiller needs a logit loss ('logit', 'dkd') or a feature loss ('cos', 'mse')")
        self.teacher = teacher.eval().requires_grad_(False)
        self.logit, self.weight, self.alpha, self.beta, self.temperature = logit, weight, alpha, beta, temperature
        if feature_layers not in FEATURE_LAYERS:
            raise ValueError(f"unknown feature layers {feature_layers!r}: expected one of {', '.join(FEATURE_LAYERS)}")
        self.feature, self.feature_weight, self.feature_layers = feature, feature_weight, feature_layers
        self.token_loss = token_loss

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode whatever the student does
        return self

    @contextmanager
    def capture(self, student: nn.Module) -> Iterator[Optional[List[torch.Tensor]]]:
        """The student's block outputs of the forward inside the context, when a feature loss is on."""
        if self.feature is None:
            yield None
        else:
            with block_outputs(student, self.feature_layers) as outputs:
                yield outputs

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor
                        ) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]], Optional[torch.Tensor]]:
        """(logits, block features when a feature loss is on, final tokens when a token loss is)."""
        with self.capture(self.teacher) as features:
            if self.token_loss is None:
                return self.teacher(images), features, None
            out = self.teacher.encode(images)
            return self.teacher.get_classifier()(out.pooled), features, out.tokens

    def forward(self, images: torch.Tensor, student_logits: torch.Tensor, target: Optional[torch.Tensor] = None,
                student_features: Optional[Sequence[torch.Tensor]] = None,
                student_out: Optional[EncoderOutput] = None) -> Dict[str, torch.Tensor]:
        """Named, weighted loss terms: 'kd_loss' or 'dkd_loss', 'feature_loss' and 'token_loss' when configured."""
        teacher_logits, teacher_features, teacher_tokens = self.teacher_outputs(images)
        terms = {}
        if self.logit == "logit":
            terms["kd_loss"] = self.weight * kd_loss(student_logits, teacher_logits, self.temperature)
        elif self.logit == "dkd":
            if target is None:
                raise ValueError("DKD needs the target classes")
            terms["dkd_loss"] = self.weight * dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta,
                                                       self.temperature)
        if self.feature is not None:
            if student_features is None:
                raise ValueError("feature distillation needs the student's block outputs (Distiller.capture)")
            feature_fn = cosine_feature_loss if self.feature == "cos" else mse_feature_loss
            terms["feature_loss"] = self.feature_weight * feature_fn(student_features, teacher_features)
        if self.token_loss is not None:
            if student_out is None:
                raise ValueError("token distillation needs the student's encoder output (student_out)")
            terms["token_loss"] = self.token_loss(student_out, teacher_tokens)
        return terms
