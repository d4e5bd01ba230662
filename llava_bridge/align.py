"""The LLaVA alignment loop that `deepspeed launch/llava_align.py` drives (LLaVA's
llava/train/train.py with HF Trainer, written out with DeepSpeed's engine).

Stage 1 ('pretrain'): vision tower and LM frozen, the projector trained (lr 1e-3, no weight
decay, 3% warmup then cosine, 1 epoch, template 'plain'). Stage 2 ('finetune'): projector and LM
trained, vision frozen (lr 2e-5, template 'vicuna_v1'). bf16 on GPU, fp32 on CPU.

The optimizer is torch's AdamW handed to `deepspeed.initialize`: an `optimizer` block in the
DeepSpeed config would build DeepSpeed's C++ CPU Adam first (about 80 s), so it is refused.
The loss is the token sum over a rank's batch divided by the token count of the global batch
(times the world size, as DeepSpeed averages gradients over ranks): N ranks give the loss and
gradients of one rank on the same global batch.
Resume: `<run>/checkpoints/step_N` (dtpclip.checkpointing layout: trainable weights, trainer
state and each rank's RNG states) plus DeepSpeed's own engine checkpoint (optimizer, scheduler;
frozen weights excluded); the data order is a seeded permutation per epoch, so a resumed run
sees the same batches.
"""
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoConfig, get_cosine_schedule_with_warmup
from transformers.integrations import HfDeepSpeedConfig

from dtpclip import checkpointing
from dtpclip.checkpoint import load_checked, read_state_dict
from dtpclip.cli import status
from dtpclip.measure import peak_resident_bytes
from llava_bridge import build
from llava_bridge.align_config import DEMO_ENCODER, STAGES, AlignConfig
from llava_bridge.conversation import IGNORE_INDEX, get_template
from llava_bridge.data import LlavaCollator, LlavaJsonDataset
from llava_bridge.model import LlavaModel



def _default_run_dir(cfg: "AlignConfig") -> str:
    """<runs root>/<--name, else llava-<stage>-<encoder>-<time>>, named by rank 0's clock."""
    name = [cfg.name or checkpointing.run_name(f"llava-{cfg.stage}-{cfg.encoder}")]
    dist.broadcast_object_list(name, src=0)
    return str(checkpointing.runs_root() / name[0])


WORLD_OF_ONE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(device: torch.device):
    """torch.distributed through DeepSpeed; a plain `python` run becomes a world of one."""
    status("starting DeepSpeed (on a machine's first run it may build its ops: minutes, with little output)")
    import deepspeed
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(zip(WORLD_OF_ONE, ("0", "1", "0", "127.0.0.1", str(port))))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(path, cfg: AlignConfig, world: int, bf16: bool, hidden: int) -> dict:
    """The json with its "auto" values filled as HF Trainer fills them; an `optimizer` block is refused."""
    config = json.loads(Path(path).read_text())
    if "optimizer" in config:
        raise ValueError(f"DeepSpeed config {path!r} has an 'optimizer' block; remove it: the loop passes torch "
                         "AdamW (DeepSpeed's would first compile its C++ CPU Adam)")
    fills = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
             "train_batch_size": cfg.batch_size * cfg.grad_accum * world, "gradient_clipping": cfg.grad_clip,
             "bf16.enabled": bf16, "fp16.enabled": cfg.precision == "fp16",
             "zero_optimization.reduce_bucket_size": hidden * hidden,
             "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "zero_optimization.stage3_param_persistence_threshold": 10 * hidden}

    def fill(node: dict, prefix: str = ""):
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                fill(value, name + ".")
            elif value == "auto":
                if name not in fills:
                    raise ValueError(f"DeepSpeed config {path!r}: no value to fill for {name!r} = 'auto'")
                node[key] = fills[name]
    fill(config)
    return config


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """HF TrainingArguments.get_warmup_steps, which LLaVA's Trainer uses: ceil(ratio * total)."""
    return math.ceil(warmup_ratio * total)


def epoch_batches(num_samples: int, micro: int, rank: int, world: int, seed: int, epoch: int):
    """This rank's micro batches of an epoch: a seeded permutation cut into global batches."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    size = micro * world
    return [order[k * size + rank * micro: k * size + (rank + 1) * micro] for k in range(num_samples // size)]


def modality_batches(lengths: Sequence[int], micro: int, rank: int, world: int, seed: int, epoch: int):
    """LLaVA's group_by_modality_length (llava_trainer.py, get_modality_length_grouped_indices): each global
    batch holds image samples only (length > 0) or text-only ones only (length < 0), the samples of one
    modality shuffled then sorted by length within each global batch, the batches shuffled. The sorted
    batch is dealt to the ranks in turn (rank r: positions r, r + world, ...), so they get similar lengths;
    LLaVA balances them greedily and keeps each modality's last, partial batch, where this drops it."""
    generator = torch.Generator().manual_seed(seed + epoch)
    size = micro * world
    global_batches = []
    for members in ([i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n < 0]):
        order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        for k in range(len(order) // size):
            global_batches.append(sorted(order[k * size:(k + 1) * size], key=lambda i: -abs(lengths[i])))
    shuffled = torch.randperm(len(global_batches), generator=generator).tolist()
    return [global_batches[k][rank::world] for k in shuffled]


def batch_schedule(cfg: AlignConfig, dataset, rank: int, world: int) -> Callable[[int], List[List[int]]]:
    """epoch -> this rank's micro batches of it (the same count every epoch)."""
    if cfg.group_by_modality_length:
        lengths = dataset.modality_lengths
        return lambda epoch: modality_batches(lengths, cfg.batch_size, rank, world, cfg.seed, epoch)
    return lambda epoch: epoch_batches(len(dataset), cfg.batch_size, rank, world, cfg.seed, epoch)


def param_groups(model: LlavaModel, cfg: AlignConfig) -> List[dict]:
    """The trainable parameters as HF Trainer groups them for LLaVA: no weight decay on biases and norm
    weights (the 1-dim ones), and the projector at --mm-projector-lr when given (LLaVA's create_optimizer)."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        projector = name.startswith("projector.") and cfg.mm_projector_lr is not None
        decay = param.ndim >= 2
        if (projector, decay) not in groups:
            groups[projector, decay] = {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                        **({"lr": cfg.mm_projector_lr} if projector else {})}
        groups[projector, decay]["params"].append(param)
    return list(groups.values())


def token_loss(logits, labels, world: int):
    """(loss to backpropagate, this rank's token-loss sum, global label-token count); see the module doc."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    count = (labels != IGNORE_INDEX).sum().float()
    if world > 1:
        dist.all_reduce(count)
    return total * world / count.clamp_min(1.0), total.detach(), count


# a run directory resumes only with these as they were: any of them changes what the projector learns from
SAME_RUN_KEYS = ("stage", "encoder", "model_kwargs", "data_path", "select_layer", "select_feature", "projector")


def default_select_feature(stage1: Optional[str], on_demo: bool) -> str:
    """Stage 1's in stage 2; on the demo data cls_patch, as its tiny towers pool the image into the class token;
    else LLaVA's patch."""
    if stage1:
        return build.trained_config(stage1)["select_feature"]
    return "cls_patch" if on_demo else "patch"


def resolve_defaults(cfg: AlignConfig) -> AlignConfig:
    from dtpclip.demo_data import ensure_demo_data
    cfg.encoder_checkpoint = build.resolve_encoder_checkpoint(cfg.encoder_checkpoint)
    cfg.encoder = cfg.encoder or build.checkpoint_encoder(cfg.encoder_checkpoint) or DEMO_ENCODER
    cfg.model_kwargs = build.encoder_kwargs(cfg.encoder_checkpoint, cfg.model_kwargs)
    cfg.run_dir = cfg.run_dir or _default_run_dir(cfg)
    stage1 = cfg.pretrain_projector if cfg.pretrain_projector and Path(cfg.pretrain_projector).is_dir() else None
    cfg.select_feature = cfg.select_feature or default_select_feature(stage1, on_demo=cfg.data_path is None)
    if cfg.data_path is None:
        demo = ensure_demo_data()
        cfg.data_path, cfg.image_folder = str(demo.llava_json), str(demo.llava_images)
    if cfg.image_folder is None:
        cfg.image_folder = str(Path(cfg.data_path).parent)
    if cfg.lm is None and stage1:
        cfg.lm = str(build.trained_lm(stage1))  # stage 2 goes on from stage 1's LM and tokenizer
    if cfg.lm is None:
        from llava_bridge.demo_lm import ensure_demo_lm
        cfg.lm = str(ensure_demo_lm(llava_json=cfg.data_path))
    cfg.lr = STAGES[cfg.stage]["lr"] if cfg.lr is None else cfg.lr
    cfg.batch_size = cfg.batch_size or STAGES[cfg.stage]["batch_size"]
    cfg.template = cfg.template or STAGES[cfg.stage]["template"]
    return cfg


def build_model(cfg: AlignConfig, lm_dtype: torch.dtype = torch.float32):
    """(LlavaModel with only the stage's parameters trainable, tokenizer); the LM is loaded in `lm_dtype`."""
    tower = build.build_vision_tower(cfg.encoder, cfg.encoder_checkpoint, cfg.select_layer, cfg.select_feature,
                                     cfg.transforms, cfg.seed, **cfg.model_kwargs)
    lm, tokenizer = build.load_lm(cfg.lm, lm_dtype)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)
    model = LlavaModel(tower, lm, cfg.projector, cfg.max_length)
    if cfg.pretrain_projector:  # a stage-1 run directory, its final/, or a projector file
        path = Path(cfg.pretrain_projector)
        path = path / "final" if (path / "final").is_dir() else path
        if (path / build.VISION_FILE).is_file():  # stage 1's own tower
            load_checked(tower.encoder, read_state_dict(path / build.VISION_FILE), path / build.VISION_FILE)
        path = path / build.PROJECTOR_FILE if path.is_dir() else path
        load_checked(model.projector, build.projector_state(path), path)
    lm.requires_grad_(cfg.stage == "finetune")
    return model, tokenizer


def gathered_state(engine, trainable_only: bool) -> dict:
    """The module's (trainable) weights, whole on rank 0 also under ZeRO-3 (collective there)."""
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only) or {}
    else:
        state = engine.module.state_dict()
    return {k: v for k, v in state.items() if k in trainable or not trainable_only}


def module_state(engine, module) -> dict:
    """`module`'s weights, gathered whole under ZeRO-3 (collective there)."""
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_final(engine, cfg: AlignConfig, tokenizer, rank: int) -> Optional[Path]:
    """Stage 1: the projector (+ a fresh tower's weights); stage 2: the whole model (see build.py)."""
    state = gathered_state(engine, trainable_only=cfg.stage == "pretrain")
    tower = module_state(engine, engine.module.vision_tower.encoder)
    if rank != 0:
        return None
    final = Path(cfg.run_dir) / "final"
    staging = final.with_name("final.tmp")
    staging.mkdir(parents=True, exist_ok=True)

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    build.save_file_atomic(part("projector."), staging / build.PROJECTOR_FILE)
    lm_path = cfg.lm
    if cfg.stage == "finetune":
        engine.module.language_model.save_pretrained(staging / build.LM_DIR, state_dict=part("language_model."))
        tokenizer.save_pretrained(staging / build.LM_DIR)
        lm_path = build.LM_DIR
    build.save_file_atomic(tower, staging / build.VISION_FILE)
    structure = build.tower_structure(engine.module.vision_tower, cfg.encoder_checkpoint, cfg.transforms)
    config = {"stage": cfg.stage, "encoder": cfg.encoder, "encoder_checkpoint": cfg.encoder_checkpoint,
              "model_kwargs": cfg.model_kwargs, "transforms": cfg.transforms, "tower_structure": structure,
              "select_layer": cfg.select_layer, "select_feature": cfg.select_feature,
              "projector": cfg.projector, "lm": lm_path, "template": cfg.template, "max_length": cfg.max_length,
              "image_aspect_ratio": cfg.image_aspect_ratio}
    (staging / build.CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def save_checkpoint(engine, cfg: AlignConfig, step: int, rank: int) -> None:
    if rank == 0:
        checkpointing.make_room(cfg.run_dir, step)
    dist.barrier()
    staging = checkpointing.staging_dir(cfg.run_dir, step)
    engine.save_checkpoint(str(staging), tag="engine", exclude_frozen_parameters=True)
    checkpointing.write_rank_part(cfg.run_dir, step, rank)
    state = gathered_state(engine, trainable_only=True)
    if rank == 0:
        checkpointing.write_main_part(cfg.run_dir, step, state, {"step": step}, asdict(cfg))
    dist.barrier()
    if rank == 0:
        checkpointing.publish(cfg.run_dir, step)
    dist.barrier()


def train(cfg: AlignConfig) -> Optional[Path]:
    """Run the stage; returns the final directory (on rank 0).

    A run leaves no process-wide state behind, so later work in the same process is unaffected:
    ZeRO-3 replaces torch.nn.functional.linear with its own wrapper (fvcore then misses every
    Linear), and a plain `python` run sets the RANK / MASTER_PORT variables of its world of one,
    which subprocesses would inherit; both are undone afterwards. (The process group itself stays:
    DeepSpeed caches its groups and cannot be initialised twice in one process.)
    """
    linear = F.linear
    own_world = "RANK" not in os.environ
    try:
        return _train(cfg)
    finally:
        F.linear = linear
        if own_world:
            for key in WORLD_OF_ONE:
                os.environ.pop(key, None)


def _train(cfg: AlignConfig) -> Optional[Path]:
    import deepspeed
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = init_distributed(device)
    cfg = resolve_defaults(cfg)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a GPU (DeepSpeed's fp16 loss scaling); on CPU use fp32")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    lm_config = AutoConfig.from_pretrained(cfg.lm, local_files_only=True)
    ds_config = deepspeed_config(cfg.deepspeed_config, cfg, world, bf16, lm_config.hidden_size)
    # Alive while the LM loads: under ZeRO-3, from_pretrained then builds it inside deepspeed.zero.Init, each
    # rank holding its shard only, as LLaVA's Trainer does (the HF integration reads this object).
    zero3 = HfDeepSpeedConfig(ds_config) if ds_config.get("zero_optimization", {}).get("stage") == 3 else None
    dtype = torch.bfloat16 if bf16 else torch.float16 if cfg.precision == "fp16" else torch.float32
    model, tokenizer = build_model(cfg, dtype)
    dataset = LlavaJsonDataset(cfg.data_path, cfg.image_folder, tokenizer, get_template(cfg.template),
                               build.image_transform(model.vision_tower, cfg.image_aspect_ratio), cfg.max_samples)
    schedule = batch_schedule(cfg, dataset, rank, world)
    batches_per_epoch = len(schedule(0))
    if batches_per_epoch < cfg.grad_accum:
        raise ValueError(f"{cfg.data_path}: {len(dataset)} samples make no full global batch of "
                         f"{cfg.batch_size * world * cfg.grad_accum}"
                         + (" of one modality" if cfg.group_by_modality_length else ""))
    total = cfg.epochs * batches_per_epoch // cfg.grad_accum
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(total, cfg.warmup_ratio), total)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    step = 0
    if cfg.resume in (None, "", "none") and checkpointing.holds_run(cfg.run_dir):
        raise FileExistsError(f"--run-dir {cfg.run_dir!r} already holds a run (checkpoints or metrics.jsonl): "
                              "pass a new --run-dir, or --resume auto to continue it")
    if cfg.resume == "auto":
        checkpointing.check_same_run(cfg.run_dir, asdict(cfg), SAME_RUN_KEYS)
    resumed = checkpointing.load_resume(cfg.resume, cfg.run_dir, rank)
    if resumed is not None:
        resume, state = resumed
        engine.load_checkpoint(str(resume), tag="engine", load_module_strict=False)
        checkpointing.set_rng_state(state["rng"])
        step = int(state["trainer"]["step"])
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    if rank == 0:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        checkpointing.trim_metrics(metrics, step)
    collate = LlavaCollator(tokenizer.pad_token_id)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=f"llava {cfg.stage}")
    window = {"loss": 0.0, "tokens": 0.0, "samples": 0, "visual": 0, "imaged": 0, "steps": 0,
              "start": time.perf_counter()}
    micro = step * cfg.grad_accum
    while step < total:
        epoch, offset = divmod(micro, batches_per_epoch)
        batches = schedule(epoch)[offset:]
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.workers)
        for batch in loader:
            batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
            logits, labels, counts = engine(**batch)
            loss, total_loss, count = token_loss(logits, labels, world)
            engine.backward(loss)
            engine.step()
            micro += 1
            window["loss"] = window["loss"] + total_loss.double()  # tensors: no host sync per step
            window["tokens"] = window["tokens"] + count.double()
            window["samples"] += len(counts)
            window["visual"] += sum(counts)
            window["imaged"] += sum(c > 0 for c in counts)
            if micro % cfg.grad_accum:
                continue
            step += 1
            window["steps"] += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                log_window(window, step, epoch, scheduler, world, rank, metrics, bar, device, dataset.counts)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(engine, cfg, step, rank)
            if step >= total:
                break
    bar.close()
    return save_final(engine, cfg, tokenizer, rank)


def log_window(window: dict, step: int, epoch: int, scheduler, world: int, rank: int, metrics: Path, bar,
               device, counts) -> None:
    """One metrics.jsonl record over the steps since the last one; the window is reset. `counts`: the
    dataset's masked samples by reason so far (this rank's)."""
    loss_sum = torch.as_tensor(window["loss"], dtype=torch.float64, device=device).clone()
    if world > 1:  # window["tokens"] is already global
        dist.all_reduce(loss_sum)
    elapsed = time.perf_counter() - window["start"]
    record = {
        "kind": "train", "step": step, "epoch": epoch, "loss": float(loss_sum) / max(1.0, float(window["tokens"])),
        "lr": scheduler.get_last_lr()[0], "step_time": elapsed / max(1, window["steps"]),
        "samples_per_s": window["samples"] * world / elapsed,
        "visual_tokens_per_sample": window["visual"] / max(1, window["imaged"]),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda"
        else peak_resident_bytes(),
        "masked_samples": counts.snapshot().skipped,
    }
    if rank == 0:
        with metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.3f}", vis_tok=f"{record['visual_tokens_per_sample']:.1f}")
    window.update(loss=0.0, tokens=0.0, samples=0, visual=0, imaged=0, steps=0, start=time.perf_counter())
