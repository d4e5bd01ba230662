"""The knobs of a LLaVA alignment run (`AlignConfig`): the launcher's flags and --config keys, and the
names they choose among. No torch here, so the launcher parses (and answers --help) before the heavy imports."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dtpclip.cli import check_config

# LLaVA-1.5's per-stage defaults (scripts/v1_5/pretrain.sh, finetune.sh: batch per GPU 32, 16)
STAGES = {"pretrain": dict(lr=1e-3, template="plain", batch_size=32),
          "finetune": dict(lr=2e-5, template="vicuna_v1", batch_size=16)}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "launch" / "configs"
SELECT_FEATURES = ("patch", "cls_patch")  # LLaVA's mm_vision_select_feature: drop the CLS token, or keep it
ASPECT_RATIOS = ("pad", "crop")  # LLaVA's image_aspect_ratio: pad to a square first, or resize and center-crop
PROJECTORS = ("mlp2x_gelu", "linear")
TEMPLATE_NAMES = ("plain", "vicuna_v1")  # llava_bridge.conversation.TEMPLATES holds them
DEMO_ENCODER = "dtp_vit_tiny_patch16_64_4x"  # the demo CLIP's tower


@dataclass
class AlignConfig:
    stage: str = field(default="pretrain", metadata={"help": "pretrain: projector only; finetune: projector + LM",
                                                     "choices": tuple(STAGES)})
    data_path: Optional[str] = field(default=None, metadata={"help": "LLaVA json (default: the demo's)"})
    image_folder: Optional[str] = field(default=None, metadata={"help": "image root (default: the demo's)"})
    encoder: Optional[str] = field(default=None, metadata={
        "help": f"registry encoder; None: the encoder checkpoint's model, else {DEMO_ENCODER}"})
    encoder_checkpoint: Optional[str] = field(default="demo", metadata={
        "help": "CLIP checkpoint for the tower; 'demo': the latest demo CLIP run (fresh with a warning if none); "
                "'none': fresh"})
    model_kwargs: dict = field(default_factory=dict, metadata={
        "help": "encoder constructor kwargs, e.g. compression=0.2 (the encoder checkpoint's own come first)",
        "kwargs": True})
    transforms: list = field(default_factory=list, metadata={
        "help": "training-free transforms of the tower, in order", "transforms": True})
    select_layer: int = field(default=-1, metadata={"help": "-1: encode() output; -k: plain ViT hidden state"})
    select_feature: Optional[str] = field(default=None, metadata={
        "help": "drop or keep CLS; default: stage 1's in stage 2, else cls_patch on the demo data (its tiny towers "
                "hold the image in the class token they were trained to pool), else patch (LLaVA's)",
        "choices": SELECT_FEATURES})
    projector: str = field(default="mlp2x_gelu", metadata={"help": "projector kind", "choices": PROJECTORS})
    pretrain_projector: Optional[str] = field(default=None, metadata={
        "help": "finetune: stage-1 output directory (or projector.safetensors, or LLaVA's mm_projector.bin) to start "
                "from; its LM too, without --lm"})
    lm: Optional[str] = field(default=None, metadata={"help": "local LM directory (default: the demo's tiny Llama)"})
    template: Optional[str] = field(default=None, metadata={"help": "default: plain (pretrain), vicuna_v1 (finetune)",
                                                            "choices": TEMPLATE_NAMES})
    deepspeed_config: str = field(default=str(CONFIG_DIR / "zero2.json"), metadata={"help": "zero2/zero3 json"})
    batch_size: Optional[int] = field(default=None, metadata={
        "help": "micro batch per rank; default: 32 (pretrain), 16 (finetune)", "min": 1})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps", "min": 1})
    lr: Optional[float] = field(default=None, metadata={"help": "default: 1e-3 (pretrain), 2e-5 (finetune)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup share of the steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    epochs: int = field(default=1, metadata={"help": "passes over the data", "min": 1})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many optimizer steps", "min": 1})
    max_samples: Optional[int] = field(default=None, metadata={"help": "use the first N records only", "min": 1})
    max_length: int = field(default=2048, metadata={"help": "LM sequence cut (after splicing)", "min": 1})
    precision: str = field(default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU; fp16 (GPU only) with "
                                                             "DeepSpeed's loss scaling",
                                                     "choices": ("auto", "bf16", "fp16", "fp32")})
    image_aspect_ratio: str = field(default="pad", metadata={
        "help": "pad: to a square of the mean colour, then resize (LLaVA-1.5); crop: resize and center-crop",
        "choices": ASPECT_RATIOS})
    mm_projector_lr: Optional[float] = field(default=None, metadata={
        "help": "the projector's own learning rate (LLaVA's --mm_projector_lr); default: --lr"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the LM's activations in backward (LLaVA's --gradient_checkpointing)"})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "every global batch all image or all text-only samples, of similar length (LLaVA's "
                "--group_by_modality_length)"})
    seed: int = field(default=0, metadata={"help": "data order and fresh weights"})
    workers: int = field(default=1, metadata={"help": "data loader processes per rank", "min": 0})
    log_every: int = field(default=10, metadata={"help": "log every N optimizer steps", "min": 1})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps (0: only at the end)",
                                                 "min": 0})
    name: Optional[str] = field(default=None, metadata={
        "help": "run name: the run directory is <runs root>/<name> (runs root: $DTPCLIP_RUNS_DIR or "
                "~/.cache/dtpclip/runs); default: llava-<stage>-<encoder>-<time>"})
    run_dir: Optional[str] = field(default=None, metadata={"help": "the run directory itself; overrides --name"})
    resume: Optional[str] = field(default="auto", metadata={"help": "'auto', a checkpoint path, or 'none'"})

    def __post_init__(self):
        check_config(self)
