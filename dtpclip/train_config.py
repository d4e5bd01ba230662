"""The knobs of a CLIP run (`TrainConfig`): the launcher's flags and --config keys. No torch here, so the
launcher parses its arguments (and answers --help) before the heavy imports."""
from dataclasses import dataclass, field
from typing import Optional

from dtpclip.cli import check_config


def _f(default, help, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every knob of a CLIP run; the launcher's flags and --config keys are these names."""

    model: str = _f("DTP-ViT-Ti-16-64-4x", "open_clip model name (ours: PlainViT-*, DTP-ViT-*)")
    model_kwargs: dict = _f({}, "encoder constructor kwargs, e.g. compression=0.2 pre_layers=3 (saved in the "
                                "checkpoint's config)", kwargs=True)
    pretrained: Optional[str] = _f(None, "initialise from an open_clip CLIP checkpoint on disk (file, checkpoint "
                                         "dir or run dir)")
    train_data: Optional[str] = _f(None, "webdataset shard spec; default: the built-in demo shards")
    eval_data: Optional[str] = _f(None, "zero-shot eval set at each epoch end; default with the demo: its eval set")
    samples_per_epoch: Optional[int] = _f(None, "samples an epoch (default: counted from the shards)", min=1)
    resampled: bool = _f(False, "draw shards with replacement (open_clip's --dataset-resampled)")
    epochs: int = _f(6, "epochs", min=1)
    batch_size: int = _f(64, "per-process batch size", min=1)
    lr: float = _f(1e-3, "peak learning rate")
    warmup_steps: int = _f(50, "linear warm-up optimizer steps, then cosine to 0", min=0)
    weight_decay: float = _f(0.1, "AdamW weight decay (not on norms, biases, embeddings, logit_scale)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW eps")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step (each its own contrastive batch)", min=1)
    grad_clip: Optional[float] = _f(1.0, "clip the gradient norm to this (none: no clipping)")
    precision: str = _f("auto", "fp32, bf16 or auto (bf16 where supported on GPU, fp32 on CPU)",
                        choices=("auto", "fp32", "bf16"))
    aux_loss_weight: float = _f(1.0, "weight of the encoder's aux loss (DTP: boundary loss; VQ-ViT: dict loss)")
    teacher: Optional[str] = _f(None, "distil from this CLIP checkpoint (file, checkpoint dir or run dir): KD on "
                                      "the in-batch image-text logits")
    distill_weight: float = _f(1.0, "weight of the distillation loss (with --teacher)")
    distill_temperature: float = _f(1.0, "KD temperature on the logits (with --teacher)")
    reduction_anneal: float = _f(0.0, "anneal the token reduction over this fraction of the steps, from none to the "
                                      "encoder's target on a half cosine (EViT's keep-rate schedule; DTP: boundary "
                                      "rate 1 -> prior); 0: off", min=0.0)
    reduction_anneal_start: float = _f(0.0, "fraction of the steps before the anneal, without reduction (EViT's "
                                            "shrink_start)", min=0.0)
    grad_checkpointing: bool = _f(False, "recompute activations in backward")
    compile: bool = _f(False, "torch.compile the model")
    lock_image: bool = _f(False, "freeze the visual tower")
    lock_text: bool = _f(False, "freeze the text tower")
    workers: int = _f(2, "data loader workers per process", min=0)
    seed: int = _f(0, "seed of model init, data order and boundary sampling")
    name: Optional[str] = _f(None, "run name: the run directory is <runs root>/<name> (runs root: "
                                   "$DTPCLIP_RUNS_DIR or ~/.cache/dtpclip/runs); default: the model and the time")
    run_dir: Optional[str] = _f(None, "the run directory itself (checkpoints, metrics.jsonl, tensorboard); "
                                      "overrides --name")
    save_every: int = _f(100, "checkpoint every N optimizer steps (and at every epoch end)", min=1)
    resume: Optional[str] = _f("auto", "auto (the run directory's latest checkpoint, if any, when its run has "
                                       "this model, kwargs and data), a checkpoint path, or none")
    log_every: int = _f(10, "log metrics every N optimizer steps", min=1)
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (for smoke tests)", min=1)

    def __post_init__(self):
        check_config(self)
        if self.reduction_anneal_start + self.reduction_anneal > 1:
            raise ValueError(f"--reduction-anneal-start ({self.reduction_anneal_start}) + --reduction-anneal "
                             f"({self.reduction_anneal}) must be at most 1: the anneal ends within the run")
