"""The alignment loop: resume continues exactly, 2 ranks give the loss of 1 rank on the same global
batch, ZeRO-3 gives ZeRO-2's losses and weights, stage 1 trains only the projector and saves it,
stage 2 saves the whole model, the caption loss falls, and a DeepSpeed `optimizer` block is refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_bridge import align
from llava_bridge.align import deepspeed_config, train
from llava_bridge.align_config import AlignConfig
from llava_bridge.build import load_trained
from llava_bridge.generate import generate

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def flags(small_demo, demo_lm, run_dir, **overrides) -> dict:
    base = dict(data_path=str(small_demo.llava_json), image_folder=str(small_demo.llava_images), lm=str(demo_lm),
                encoder="plain_vit_tiny_patch8_64", encoder_checkpoint="none", batch_size=8, workers=0,
                log_every=1, run_dir=str(run_dir))
    return {**base, **overrides}


def losses(run_dir) -> dict:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_resume_continues_exactly(small_demo, demo_lm, tmp_path, monkeypatch):
    full = AlignConfig(**flags(small_demo, demo_lm, tmp_path / "full", max_steps=8))
    train(full)
    reference = losses(full.run_dir)
    assert sorted(reference) == list(range(1, 9))

    real_log = align.log_window

    def crash_at_step_7(window, step, *args):
        real_log(window, step, *args)
        if step == 7:
            raise KeyboardInterrupt  # after checkpoints at steps 3 and 6: step 7 is lost
    monkeypatch.setattr(align, "log_window", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "cut", max_steps=8, save_every=3)))
    monkeypatch.setattr(align, "log_window", real_log)
    assert (tmp_path / "cut" / "latest").read_text().strip() == "checkpoints/step_00000006"
    train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "cut", max_steps=8, save_every=3)))
    assert losses(tmp_path / "cut") == reference  # every step's loss, bit for bit


def test_two_ranks_match_one_on_the_same_global_batch(small_demo, demo_lm, tmp_path):
    """Token-count normalisation over the global batch: 2 ranks x 4 = 1 rank x 8, two steps running."""
    train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "one", max_steps=2)))
    assert not set(DIST_VARS) & set(os.environ)  # a subprocess must not inherit the world of one
    single = losses(tmp_path / "one")
    args = flags(small_demo, demo_lm, tmp_path / "two", batch_size=4, max_steps=2)
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "launch" / "llava_align.py")] + cli, check=True, timeout=240,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    double = losses(tmp_path / "two")
    assert single[2] != single[1]  # the first step changed the projector
    assert double == pytest.approx(single, abs=1e-5)


def test_stage1_trains_only_the_projector_and_the_caption_loss_falls(small_demo, demo_lm, tmp_path):
    cfg = AlignConfig(**flags(small_demo, demo_lm, tmp_path, epochs=2, lr=3e-3))
    final = train(cfg)
    curve = list(losses(tmp_path).values())
    assert len(curve) == 2 * (192 // 8)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5  # measured: 4.72 -> 3.60
    assert sorted(p.name for p in final.iterdir()) == ["llava_config.json", "projector.safetensors",
                                                       "vision_tower.safetensors"]
    assert set(load_file(str(final / "projector.safetensors"))) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    model, _, template, _ = load_trained(final)
    assert template.name == "plain"
    image = next(small_demo.llava_images.rglob("*.jpg"))
    assert isinstance(generate(final, image, "Describe it.", max_new_tokens=4), str)


def test_stage2_saves_the_whole_model_that_loads_back(small_demo, demo_lm, tmp_path):
    stage1 = train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "s1", max_steps=2)))
    stage2 = train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "s2", max_steps=2, stage="finetune",
                                       pretrain_projector=str(stage1))))
    model, tokenizer, template, config = load_trained(stage2)
    assert template.name == "vicuna_v1" and config["lm"] == "lm" and (stage2 / "lm" / "model.safetensors").is_file()
    assert tokenizer.eos_token == "</s>"


def test_optimizer_block_in_deepspeed_config_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "train_batch_size": "auto"}))
    with pytest.raises(ValueError, match="has an 'optimizer' block"):
        deepspeed_config(str(path), AlignConfig(), 1, False, 64)
    filled = deepspeed_config(str(ROOT / "launch" / "configs" / "zero3.json"), AlignConfig(batch_size=4, grad_accum=2),
                              2, True, 64)
    assert filled["train_batch_size"] == 16 and filled["bf16"]["enabled"] is True
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def test_zero3_gives_the_losses_and_projector_of_zero2(small_demo, demo_lm, tmp_path, monkeypatch):
    """... and loads the LM already partitioned (inside zero.Init, as LLaVA's Trainer does)."""
    from llava_bridge import build
    linear = torch.nn.functional.linear
    load_lm, partitioned = build.load_lm, {}

    def spy(path, dtype=torch.float32):
        lm, tokenizer = load_lm(path, dtype)
        partitioned[len(partitioned)] = all(hasattr(p, "ds_id") for p in lm.parameters())
        return lm, tokenizer
    monkeypatch.setattr(build, "load_lm", spy)
    runs = {}
    for stage in ("zero2", "zero3"):
        final = train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / stage, max_steps=3,
                                          deepspeed_config=str(ROOT / "launch" / "configs" / f"{stage}.json"))))
        runs[stage] = losses(tmp_path / stage), load_file(str(final / "projector.safetensors"))
    assert partitioned == {0: False, 1: True}
    assert runs["zero3"][0] == pytest.approx(runs["zero2"][0], abs=1e-5)
    assert torch.nn.functional.linear is linear  # ZeRO-3's process-wide patch is undone
    for name, weight in runs["zero2"][1].items():
        assert (runs["zero3"][1][name] - weight).abs().max() < 1e-5


def test_a_trained_model_keeps_its_own_tower(small_demo, demo_lm, tmp_path):
    """The CLIP run the tower came from may later prune or rewrite that checkpoint: the model does not change."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    clip = open_clip.create_model("PlainViT-Ti-8-64")
    (tmp_path / "clip").mkdir()
    save_file(clip.state_dict(), str(tmp_path / "clip" / "model.safetensors"))
    final = train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "run", max_steps=1,
                                      encoder_checkpoint=str(tmp_path / "clip" / "model.safetensors"))))
    torch.manual_seed(1)
    save_file(open_clip.create_model("PlainViT-Ti-8-64").state_dict(), str(tmp_path / "clip" / "model.safetensors"))
    model, _, _, _ = load_trained(final)  # the checkpoint was rewritten ...
    expected = clip.visual.trunk.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.vision_tower.encoder.state_dict().items())
    (tmp_path / "clip" / "model.safetensors").unlink()
    load_trained(final)  # ... and then removed


def test_stage2_goes_on_from_stage1s_lm_and_features_and_reads_llavas_mm_projector(small_demo, demo_lm, tmp_path):
    stage1 = train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "s1", max_steps=1, select_feature="cls_patch")))
    stage2 = {k: v for k, v in flags(small_demo, demo_lm, tmp_path / "s2", stage="finetune",
                                     pretrain_projector=str(stage1)).items() if k != "lm"}
    resolved = align.resolve_defaults(AlignConfig(**stage2))
    assert (resolved.lm, resolved.select_feature) == (str(demo_lm), "cls_patch")
    projector = load_file(str(stage1 / "projector.safetensors"))
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.items()}, tmp_path / "mm_projector.bin")
    model, _ = align.build_model(align.resolve_defaults(AlignConfig(**{
        **stage2, "lm": str(demo_lm), "pretrain_projector": str(tmp_path / "mm_projector.bin")})))
    assert all(torch.equal(model.projector.state_dict()[k], v) for k, v in projector.items())


def test_the_demo_keeps_the_class_token_and_other_data_drops_it(small_demo, demo_lm, tmp_path, monkeypatch):
    import dtpclip.demo_data
    monkeypatch.setattr(dtpclip.demo_data, "ensure_demo_data", lambda: small_demo)
    given = flags(small_demo, demo_lm, tmp_path / "run")
    on_demo = {k: v for k, v in given.items() if k not in ("data_path", "image_folder")}
    assert align.resolve_defaults(AlignConfig(**on_demo)).select_feature == "cls_patch"
    assert align.resolve_defaults(AlignConfig(**given)).select_feature == "patch"  # LLaVA's
    assert align.resolve_defaults(AlignConfig(**given, select_feature="cls_patch")).select_feature == "cls_patch"


def test_a_run_directory_is_not_resumed_with_other_visual_features(small_demo, demo_lm, tmp_path):
    train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "run", max_steps=2, save_every=1)))
    with pytest.raises(FileExistsError, match="select_feature: 'patch' there, 'cls_patch' now"):
        train(AlignConfig(**flags(small_demo, demo_lm, tmp_path / "run", max_steps=3, select_feature="cls_patch")))


def test_the_demo_lm_is_named_by_its_data_and_never_rebuilt_in_place(small_demo, tmp_path):
    from llava_bridge.demo_lm import ensure_demo_lm
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(json.loads(small_demo.llava_json.read_text())[:40]))
    first = ensure_demo_lm(tmp_path / "lms", small_demo.llava_json, steps=2)
    written = (first / "model.safetensors").stat().st_mtime_ns
    second = ensure_demo_lm(tmp_path / "lms", fewer, steps=2)
    assert second != first and second.parent == first.parent
    assert ensure_demo_lm(tmp_path / "lms", small_demo.llava_json, steps=2) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written
