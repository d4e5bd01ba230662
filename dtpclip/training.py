"""The CLIP training loop that launch/clip_pretrain.py drives (accelerate underneath).

Any registry encoder is the visual tower (through the open_clip bridge); the loss is open_clip's
ClipLoss gathered across ranks with gradients (local loss) plus the encoder's `aux_loss`.
Checkpoints are resumable exactly (see checkpointing.py): on CPU with a fixed seed the losses
after a resume equal those of an uninterrupted run.
"""
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from dtpclip import checkpointing
from dtpclip.checkpoint import resolve_checkpoint
from dtpclip.clip import create_clip_and_transforms, encode_image
from dtpclip.data import make_train_loader
from dtpclip.evaluate import resolve_model
from dtpclip.losses import clip_distill_loss
from dtpclip.measure import peak_resident_bytes
from dtpclip.train_config import TrainConfig

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups: decay on weight matrices only; norms, biases, embeddings and logit_scale excluded
    by rule here (open_clip's own default depends on the model name containing 'vit')."""
    no_decay_names = ("logit_scale", "logit_bias", "positional_embedding", "token_embedding", "pos_embed",
                      "cls_token", "class_embedding")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or any(n in name for n in no_decay_names) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_clip_teacher(path: str, context_length: int, device) -> nn.Module:
    """A frozen CLIP from a checkpoint whose config names its model; it must read the same token ids."""
    source = resolve_model(path)
    teacher, _, _ = create_clip_and_transforms(source.name, str(source.weights), source.model_kwargs)
    if teacher.context_length != context_length:
        raise ValueError(f"teacher {path!r} reads {teacher.context_length} text tokens, the student "
                         f"{context_length}: distillation needs one tokenization")
    return teacher.to(device).eval().requires_grad_(False)


@torch.no_grad()
def teacher_view(teacher: nn.Module, images: torch.Tensor, texts: torch.Tensor, with_tokens: bool):
    """A frozen teacher CLIP's in-batch image->text logits [B, B] (its own logit scale) and, `with_tokens`, its
    visual tower's final tokens (for an encoder's `token_distill_loss`), from one forward of each tower."""
    image, out = encode_image(teacher, images) if with_tokens else (teacher.encode_image(images), None)
    text = teacher.encode_text(texts)
    logits = teacher.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    return logits, None if out is None else out.tokens


class ContrastiveModel(nn.Module):
    """The CLIP with one forward returning what the loss needs, so DDP wraps a single forward."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, texts: torch.Tensor, teacher_tokens: Optional[torch.Tensor] = None):
        """(image features, text features, logit scale, aux loss, stats, token distillation loss): the last is the
        encoder's `token_distill_loss` against `teacher_tokens` where both exist, else 0."""
        image_features, out = encode_image(self.clip, images)
        text_features = self.clip.encode_text(texts)
        token_loss = (self.clip.visual.trunk.token_distill_loss(out, teacher_tokens) if teacher_tokens is not None
                      else out.aux_loss.new_zeros(()))
        return (F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1),
                self.clip.logit_scale.exp(), out.aux_loss, out.stats, token_loss)


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return "no" if cfg.precision == "fp32" else cfg.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class MetricsWriter:
    """metrics.jsonl (one json object per record) and tensorboard, on the main process. Records past
    `resumed_at` (written after the checkpoint a resume starts from) are dropped, so none repeats."""

    def __init__(self, run_dir: Path, enabled: bool, resumed_at: int = 0):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            run_dir.mkdir(parents=True, exist_ok=True)
            checkpointing.trim_metrics(run_dir / "metrics.jsonl", resumed_at)
            self.file = open(run_dir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _demo_defaults(cfg: TrainConfig) -> TrainConfig:
    """No data given: the built-in demo shards (generated on first use) and their eval set."""
    if cfg.train_data is not None:
        return cfg
    from dtpclip.demo_data import ensure_demo_data
    paths = ensure_demo_data()
    return dataclasses.replace(cfg, train_data=paths.train_shards, eval_data=cfg.eval_data or str(paths.eval_dir))


RESUME_KEYS = ("model", "model_kwargs", "train_data")  # what a resumed run must share with the saved one


def _run_dir(cfg: TrainConfig) -> Path:
    """--run-dir, else <runs root>/<--name or model-time>, the same on every rank."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    name = [cfg.name or checkpointing.run_name(cfg.model)]
    broadcast_object_list(name)  # the main process's clock names the run
    return checkpointing.runs_root() / name[0]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a CLIP training run; returns the last metrics."""
    own_process_group = not torch.distributed.is_initialized()  # else a caller's (e.g. DeepSpeed's) stays up
    accelerator = Accelerator(mixed_precision=_precision(cfg), gradient_accumulation_steps=cfg.grad_accum_steps)
    cfg = _demo_defaults(cfg)  # generation holds a file lock: other ranks wait, then reuse it
    set_seed(cfg.seed)
    run_dir = _run_dir(cfg)
    pretrained = str(resolve_checkpoint(cfg.pretrained)[0]) if cfg.pretrained else None  # a run dir as --teacher
    clip, preprocess_train, preprocess_val = create_clip_and_transforms(cfg.model, pretrained, cfg.model_kwargs)
    if cfg.lock_image:
        clip.lock_image_tower()
    if cfg.lock_text:
        clip.lock_text_tower()
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    loader = make_train_loader(
        cfg.train_data, preprocess_train, tokenizer, cfg.batch_size, num_workers=cfg.workers,
        rank=accelerator.process_index, world_size=accelerator.num_processes, resampled=cfg.resampled,
        samples_per_epoch=cfg.samples_per_epoch, seed=cfg.seed)
    steps_per_epoch = loader.num_batches // cfg.grad_accum_steps
    total_steps = steps_per_epoch * cfg.epochs
    model = ContrastiveModel(clip)
    anneal = reduction_annealer(cfg, clip.visual.trunk, total_steps)
    teacher = load_clip_teacher(cfg.teacher, clip.context_length, accelerator.device) if cfg.teacher else None
    # fused: one kernel for all parameters, 5x faster a step on the CPU demo (README, Design decisions)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)

    step, epoch, batch_in_epoch = 0, 0, 0
    config_record = {**dataclasses.asdict(cfg), "world_size": accelerator.num_processes}
    if cfg.resume in (None, "", "none") and checkpointing.holds_run(run_dir):
        raise FileExistsError(f"run directory {str(run_dir)!r} already holds a run (checkpoints or metrics.jsonl): "
                              "pass a new --name or --run-dir, or --resume auto to continue it")
    if cfg.resume == "auto":
        checkpointing.check_same_run(run_dir, config_record, RESUME_KEYS)
    resumed = checkpointing.load_resume(cfg.resume, run_dir, accelerator.process_index)
    if resumed is not None:
        resume_from, state = resumed
        clip.load_state_dict(state["model"])
        optimizer.load_state_dict(state["trainer"]["optimizer"])
        scheduler.load_state_dict(state["trainer"]["scheduler"])
        step, epoch, batch_in_epoch = (state["trainer"][k] for k in ("step", "epoch", "batch_in_epoch"))
        checkpointing.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, batch_in_epoch)
    if cfg.compile:
        model = torch.compile(model)
    # Not the loader (it splits by rank itself) and not the scheduler (accelerate would step it once
    # per process; ours counts this process's optimizer steps).
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics = MetricsWriter(run_dir, accelerator.is_main_process, resumed_at=step)
    evaluator = _zero_shot_evaluator(cfg, clip, preprocess_val, tokenizer, accelerator)

    def save() -> None:
        if accelerator.is_main_process:
            checkpointing.make_room(run_dir, step)
        accelerator.wait_for_everyone()
        checkpointing.write_rank_part(run_dir, step, accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
            checkpointing.write_main_part(run_dir, step, clip.state_dict(), trainer_state, config_record)
            checkpointing.publish(run_dir, step)
            if not cfg.run_dir:  # a run in the runs root with a checkpoint: the evaluators' default from now
                checkpointing.mark_latest_run(run_dir)
        accelerator.wait_for_everyone()

    last, evals, started = {}, [], time.perf_counter()

    def evaluate(at_epoch: float) -> None:
        nonlocal last
        result = evaluator()
        if result is not None:
            metrics.write({"kind": "eval", "step": step, "epoch": at_epoch, **result})
            last = {**last, **{f"zeroshot_{k}": v for k, v in result.items()}}
            evals.append((at_epoch, result))
            log.info("epoch %g/%d zero-shot: top-1 %.4f, top-5 %.4f", at_epoch, cfg.epochs, result["top1"],
                     result["top5"])

    while epoch < cfg.epochs and (cfg.max_steps is None or step < cfg.max_steps):
        loader.set_epoch(epoch, skip_batches=batch_in_epoch * cfg.grad_accum_steps)
        model.train()
        bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not accelerator.is_main_process, dynamic_ncols=True)
        window = _Window()
        end = time.perf_counter()
        for micro, (images, texts) in enumerate(loader):
            images, texts = images.to(accelerator.device), texts.to(accelerator.device)
            window.data_time += time.perf_counter() - end
            anneal(step)
            with accelerator.accumulate(model):
                terms, stats = contrastive_step(model, loss_fn, images, texts, cfg, accelerator, teacher)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(terms, stats, images.shape[0])
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            with torch.no_grad():  # open_clip's clamp: logit scale at most 100
                clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            batch_in_epoch += 1
            if step % cfg.log_every == 0 or batch_in_epoch == steps_per_epoch:
                last = window.record(step, epoch, scheduler.get_last_lr()[0], accelerator)
                metrics.write(last)
                bar.set_postfix(loss=f"{last['contrastive_loss']:.3f}")
                window = _Window()
            bar.update(1)
            if step % cfg.save_every == 0 and batch_in_epoch < steps_per_epoch:
                save()
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            end = time.perf_counter()
        bar.close()
        if batch_in_epoch == steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            if evaluator is not None:
                evaluate(epoch)
        elif evaluator is not None:  # stopped by --max-steps: the model as it ends is evaluated too
            evaluate(round(epoch + batch_in_epoch / steps_per_epoch, 3))
        save()
    metrics.close()
    if accelerator.is_main_process:
        print(run_summary(run_dir, step, evals, time.perf_counter() - started), flush=True)
    if own_process_group:
        accelerator.end_training()
    return last


def run_summary(run_dir: Path, step: int, evals: list, seconds: float) -> str:
    """The end of a run in a few lines: where it is, how long it took, its zero-shot figures."""
    lines = [f"run finished: {step} steps in {seconds / 60:.1f} min", f"  run directory   {run_dir}",
             f"  checkpoint      {checkpointing.latest_checkpoint(run_dir)}"]
    if evals:
        best_epoch, best = max(evals, key=lambda e: e[1]["top1"])
        lines += [f"  zero-shot top-1 {evals[-1][1]['top1']:.4f} at the end (epoch {evals[-1][0]:g}), "
                  f"best {best['top1']:.4f} (epoch {best_epoch:g})",
                  f"  evaluate again  python -m dtpclip.zeroshot --checkpoint {run_dir}"]
    return "\n".join(lines)


def reduction_strength(progress: float, start: float, length: float) -> float:
    """EViT's keep-rate schedule (Liang et al. 2022, youweiliang/evit `adjust_keep_rate`) as a reduction
    strength: 0 (no reduction) until `start`, a half cosine up to 1 over `length`, then 1 (fractions of
    the run). EViT's DeiT-S: start 10 / 300 epochs, length 100 / 300."""
    if progress >= start + length:
        return 1.0
    return 0.0 if progress <= start else (1.0 - math.cos(math.pi * (progress - start) / length)) / 2.0


def reduction_annealer(cfg: TrainConfig, encoder: nn.Module, total_steps: int):
    """step -> None, setting the encoder's reduction strength (no-op without --reduction-anneal)."""
    if not cfg.reduction_anneal:
        return lambda step: None

    def anneal(step: int) -> None:
        encoder.set_reduction_strength(reduction_strength(step / total_steps, cfg.reduction_anneal_start,
                                                          cfg.reduction_anneal))
    try:  # an encoder that cannot anneal says so before the first step
        anneal(0)
    except ValueError as e:
        raise ValueError(f"--reduction-anneal with {cfg.model}: {e}") from e
    return anneal


def contrastive_step(model, loss_fn, images, texts, cfg: TrainConfig, accelerator, teacher=None):
    """Forward, loss and backward of one micro-batch (gradient clipping on the syncing one).

    Returns the loss terms by name (unweighted) and the encoder's stats.
    """
    with_tokens = teacher is not None and hasattr(accelerator.unwrap_model(model).clip.visual.trunk,
                                                  "token_distill_loss")
    teacher_logits, teacher_tokens = (teacher_view(teacher, images, texts, with_tokens) if teacher is not None
                                      else (None, None))
    image_features, text_features, logit_scale, aux_loss, stats, token_loss = model(images, texts, teacher_tokens)
    terms = {"contrastive_loss": loss_fn(image_features, text_features, logit_scale), "aux_loss": aux_loss}
    total = terms["contrastive_loss"] + cfg.aux_loss_weight * aux_loss
    if teacher is not None:
        terms["distill_loss"] = clip_distill_loss(image_features, text_features, logit_scale, teacher_logits,
                                                  cfg.distill_temperature)
        total = total + cfg.distill_weight * terms["distill_loss"]
    if with_tokens:  # weighted by the method, as its aux_loss
        terms["token_distill_loss"] = token_loss
        total = total + token_loss
    accelerator.backward(total)
    if accelerator.sync_gradients and cfg.grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    return terms, stats


class _Window:
    """Sums over the steps between two log records; reads tensors (one host sync) only when logging."""

    def __init__(self):
        self.start = time.perf_counter()
        self.data_time, self.samples, self.micro = 0.0, 0, 0
        self.sums = {}

    def add(self, terms: dict, stats: dict, batch: int) -> None:
        for k, v in {**terms, **stats}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach()
        self.samples += batch
        self.micro += 1

    def record(self, step: int, epoch: int, lr: float, accelerator) -> dict:
        elapsed = time.perf_counter() - self.start
        n = max(self.micro, 1)
        losses = {k: float(accelerator.reduce(torch.as_tensor(v, device=accelerator.device) / n, "mean"))
                  for k, v in self.sums.items()}  # averaged over ranks: the global batch's figures
        record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr, **losses,
                  "data_time": self.data_time / n, "batch_time": elapsed / n,
                  "samples_per_s": self.samples * accelerator.num_processes / max(elapsed, 1e-9)}
        peak = (torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda" else peak_resident_bytes())
        if peak is not None:
            record["peak_memory_mb"] = peak / 2**20
        return record


def _zero_shot_evaluator(cfg, clip, preprocess_val, tokenizer, accelerator):
    """Epoch-end zero-shot on the main process (the others wait); None without eval data."""
    if not cfg.eval_data:
        return None
    from dtpclip.zeroshot import run_zero_shot

    def run():
        result = None
        if accelerator.is_main_process:
            result = run_zero_shot(clip, tokenizer, cfg.eval_data, preprocess_val, device=accelerator.device)
            result = {k: v for k, v in result.items() if k in ("top1", "top5", "mean_per_class_recall", "seconds")}
        accelerator.wait_for_everyone()
        return result

    return run
