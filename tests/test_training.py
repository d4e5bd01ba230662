"""The CLIP loop: resume continues exactly (also after SIGKILL), loss falls, parameter groups."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from accelerate import Accelerator

from dtpclip.checkpoint import read_state_dict
from dtpclip.checkpoint import resolve_checkpoint
from dtpclip.training import (ContrastiveModel, TrainConfig, contrastive_step, load_clip_teacher, param_groups,
                               reduction_strength, train)

ROOT = Path(__file__).resolve().parents[1]


def config(name, demo, run_dir, **overrides) -> TrainConfig:
    base = dict(model=name, train_data=demo.train_shards, eval_data="", batch_size=16, workers=1, lr=1e-3,
                warmup_steps=2, epochs=2, log_every=1, save_every=3, run_dir=str(run_dir), resume="auto")
    return TrainConfig(**{**base, **overrides})


def losses(run_dir) -> dict:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["contrastive_loss"] for r in records if r["kind"] == "train"}


def test_resume_continues_exactly(micro_clip_name, small_demo, tmp_path):
    full = config(micro_clip_name, small_demo, tmp_path / "full")
    train(full)
    reference = losses(full.run_dir)
    assert len(reference) == 2 * (192 // 16)
    interrupted = config(micro_clip_name, small_demo, tmp_path / "cut", max_steps=7)
    train(interrupted)  # checkpoints at step 3 and 6, then one step more that is lost
    resumed = config(micro_clip_name, small_demo, tmp_path / "cut")
    train(resumed)
    after = losses(resumed.run_dir)
    assert after == reference  # every step's loss, bit for bit, including those after step 6


def test_resume_after_sigkill_mid_run(micro_clip_name, small_demo, tmp_path):
    full = config(micro_clip_name, small_demo, tmp_path / "full", epochs=1)
    train(full)
    run_dir = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "tests" / "micro_clip.py"), "--model", micro_clip_name,
            "--train-data", small_demo.train_shards, "--eval-data", "", "--batch-size", "16", "--workers", "1",
            "--lr", "1e-3", "--warmup-steps", "2", "--epochs", "1", "--log-every", "1", "--save-every", "3",
            "--run-dir", str(run_dir)]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)})
    latest = run_dir / "latest"
    deadline = time.time() + 300  # generous: a loaded machine starts the subprocess slowly
    while not (latest.exists() and latest.read_text().strip() >= "checkpoints/step_00000006") and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "the run was killed before its first checkpoint"
    train(config(micro_clip_name, small_demo, run_dir, epochs=1))
    assert losses(run_dir) == losses(full.run_dir)


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale():
    model = open_clip.create_model("DTP-ViT-Ti-8-64-4x")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "positional_embedding", "token_embedding.weight", "visual.trunk.pos_embed",
            "visual.trunk.cls_token", "ln_final.weight", "visual.trunk.blocks.0.attn.qkv.bias"} <= no_decay_names
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"text_projection", "visual.head.proj.weight", "visual.trunk.blocks.0.attn.qkv.weight"} <= decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_loss_falls_on_demo_shards(micro_clip_name, small_demo, tmp_path):
    cfg = config(micro_clip_name, small_demo, tmp_path, epochs=4, lr=3e-3)
    train(cfg)
    curve = list(losses(cfg.run_dir).values())
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.2


def test_pretrained_may_be_a_run_directory(micro_vit_clip_name, micro_clip_name, small_demo, tmp_path):
    train(config(micro_vit_clip_name, small_demo, tmp_path / "vit", epochs=1, max_steps=3))
    weights = resolve_checkpoint(tmp_path / "vit")[0]
    first = {}
    for form, pretrained in (("file", weights), ("run", tmp_path / "vit")):
        train(config(micro_clip_name, small_demo, tmp_path / form, epochs=1, max_steps=2, pretrained=str(pretrained)))
        first[form] = losses(tmp_path / form)
    assert first["run"] == first["file"] and len(first["run"]) == 2


def test_reduction_strength_is_evits_keep_rate_schedule():
    """EViT's keep rate base + (1 - base)(cos(pi t) + 1) / 2 over the anneal is 1 - strength (1 - base)."""
    def evit_keep_rate(progress, start, length, base=0.25):
        if progress < start:
            return 1.0
        if progress >= start + length:
            return base
        return base + (1 - base) * (math.cos(math.pi * (progress - start) / length) + 1) / 2

    for progress in (0.0, 0.05, 0.1, 0.2, 0.25, 0.37, 0.4, 0.9):
        assert 1 - reduction_strength(progress, 0.1, 0.3) * 0.75 == pytest.approx(evit_keep_rate(progress, 0.1, 0.3))
    assert reduction_strength(0.0, 0.0, 0.0) == 1.0  # no anneal: full reduction from the first step


def test_anneal_takes_dtp_from_no_pooling_to_its_prior(micro_clip_name, micro_vit_clip_name, small_demo, tmp_path):
    cfg = config(micro_clip_name, small_demo, tmp_path / "anneal", epochs=1, reduction_anneal=0.5)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "anneal" / "metrics.jsonl").read_text().splitlines()]
    ratio = [r["boundary_ratio"] for r in records if r["kind"] == "train"]
    assert ratio[0] > 0.98 and max(ratio[6:]) < 0.4  # 12 steps: cosine over the first 6, then at the prior (0.25)
    assert ratio[:6] == sorted(ratio[:6], reverse=True)
    with pytest.raises(ValueError, match="has no token reduction to anneal; DTP-ViT"):
        train(config(micro_vit_clip_name, small_demo, tmp_path / "plain", reduction_anneal=0.5))
    with pytest.raises(ValueError, match=r"--reduction-anneal-start \(0.8\) \+ --reduction-anneal \(0.5\) must "):
        config(micro_clip_name, small_demo, tmp_path / "bad", reduction_anneal=0.5, reduction_anneal_start=0.8)


def run_contrastive_steps(tmp_path, processes: int) -> list:
    out = tmp_path / f"losses_{processes}.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else [sys.executable]
    subprocess.run(launcher + [str(ROOT / "tests" / "dist_contrastive.py"), str(out)], check=True, timeout=240,
                   env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    return json.loads(out.read_text())["losses"]


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    """Loss gathered across ranks with gradients + DDP: 2 ranks x 4 images = 1 rank x 8, two steps running."""
    single, double = run_contrastive_steps(tmp_path, 1), run_contrastive_steps(tmp_path, 2)
    assert single[1] != single[0]  # the first step changed the weights
    assert double == pytest.approx(single, abs=1e-5)



def test_distilling_from_a_clip_teacher(micro_vit_clip_name, small_demo, tmp_path):
    """A teacher equal to the student gives zero KD; training towards a different teacher logs a falling KD."""
    name = micro_vit_clip_name
    teacher_run = tmp_path / "teacher"
    train(config(name, small_demo, teacher_run, epochs=1, max_steps=3, seed=1))
    student = config(name, small_demo, tmp_path / "student", epochs=1, max_steps=6, teacher=str(teacher_run),
                     distill_weight=5.0)
    clip = open_clip.create_model(name)
    clip.load_state_dict(read_state_dict(resolve_checkpoint(teacher_run)[0]))
    teacher = load_clip_teacher(str(teacher_run), clip.context_length, "cpu")
    images, texts = torch.randn(4, 3, 64, 64), torch.randint(1, 49000, (4, 24))
    terms, _ = contrastive_step(ContrastiveModel(clip), open_clip.ClipLoss(), images, texts, student, Accelerator(),
                                teacher)
    assert abs(terms["distill_loss"].item()) < 1e-6
    train(student)
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    distill = [r["distill_loss"] for r in records if r["kind"] == "train"]
    assert len(distill) == 6 and distill[-1] < distill[0]


def test_a_dynamicvit_student_adds_its_token_distillation_against_the_teachers_tokens(micro_vit_clip_name):
    """With a teacher, the step adds the encoder's own `token_distill_loss` on the teacher CLIP's visual tokens;
    an encoder without one (the plain ViT) gets no such term."""
    from micro_clip import register_micro_clip
    from dtpclip.clip import encode_image
    torch.manual_seed(0)
    student = open_clip.create_model(register_micro_clip("dynamic"))
    teacher = open_clip.create_model(micro_vit_clip_name)
    images, texts = torch.randn(4, 3, 64, 64), torch.randint(1, 49000, (4, 24))
    cfg = TrainConfig(model="micro", teacher="given")
    torch.manual_seed(1)
    terms, _ = contrastive_step(ContrastiveModel(student), open_clip.ClipLoss(), images, texts, cfg, Accelerator(),
                                teacher.eval())
    torch.manual_seed(1)  # the same Gumbel keep decisions
    expected = student.visual.trunk.token_distill_loss(encode_image(student, images)[1],
                                                       encode_image(teacher, images)[1].tokens)
    assert terms["token_distill_loss"] > 0 and torch.allclose(terms["token_distill_loss"], expected)
    plain, _ = contrastive_step(ContrastiveModel(teacher), open_clip.ClipLoss(), images, texts, cfg, Accelerator(),
                                teacher)
    assert "token_distill_loss" not in plain and abs(plain["distill_loss"].item()) < 1e-6


def test_teacher_with_another_tokenization_is_refused(micro_vit_clip_name, small_demo, tmp_path):
    train(config(micro_vit_clip_name, small_demo, tmp_path / "teacher", epochs=1, max_steps=1))
    with pytest.raises(ValueError, match="reads 24 text tokens, the student 77"):
        load_clip_teacher(str(tmp_path / "teacher"), 77, "cpu")


def test_runs_are_named_per_run_and_resume_only_their_own_model(micro_clip_name, micro_vit_clip_name, small_demo,
                                                               tmp_path, monkeypatch):
    """After one run, a run of another model with no run flags trains that model; pointing it at the first
    run's directory is refused, since --resume auto would continue the other model."""
    from dtpclip.checkpointing import latest_run
    monkeypatch.setenv("DTPCLIP_RUNS_DIR", str(tmp_path))
    flags = dict(train_data=small_demo.train_shards, eval_data="", batch_size=16, workers=0, epochs=1,
                 samples_per_epoch=32, warmup_steps=1)
    train(TrainConfig(model=micro_clip_name, **flags))
    first = latest_run()
    train(TrainConfig(model=micro_vit_clip_name, **flags))
    second = latest_run()
    assert first != second and first.parent == second.parent == tmp_path
    assert second.name.startswith(micro_vit_clip_name) and (second / "latest").is_file()
    assert sorted(losses(first)) == sorted(losses(second)) == [2]
    with pytest.raises(FileExistsError, match=r"holds another run \(model: 'DTP-Micro-test' there, 'VIT-Micro-test'"):
        train(TrainConfig(model=micro_vit_clip_name, run_dir=str(first), **flags))
