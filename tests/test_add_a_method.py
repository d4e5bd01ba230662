"""README's "Add a method" example, taken from README.md itself and written into a temporary module: the
family it declares is listed, builds in open_clip, trains a CLIP step, runs zero-shot, profile and a LLaVA
step, and passes the family contract, with no file of the project touched."""
import importlib
import json
import re
import sys
from pathlib import Path

import open_clip
import pytest
import torch

import dtpclip
from dtpclip import profile, zeroshot
from dtpclip.training import TrainConfig, train
from llava_bridge.align_config import AlignConfig
from llava_bridge.align import train as align_train

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Add a method", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    (folder / "norm_prune.py").write_text(readme_example())
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("norm_prune")
    finally:
        sys.path.remove(str(folder))


def test_the_family_is_listed_with_settings_read_off_the_model(toy_family):
    names = {i.name for i in dtpclip.list_encoders("normprune")}
    assert {"normprune_vit_tiny_patch8_64", "normprune_vit_tiny_patch8_64_quarter"} <= names
    assert dtpclip.encoder_info("NormPrune-ViT-Ti-8-64-quarter").settings() == {"keep": 0.25, "after": 1}
    assert "NormPrune-ViT-Ti-8-64" in open_clip.list_models()


def test_the_family_trains_evaluates_profiles_and_feeds_llava(toy_family, small_demo, demo_lm, tmp_path, capsys):
    run = tmp_path / "clip"
    train(TrainConfig(model="NormPrune-ViT-Ti-8-64", model_kwargs={"keep": 0.4}, train_data=small_demo.train_shards,
                      eval_data=str(small_demo.eval_dir), samples_per_epoch=16, batch_size=8, epochs=1, workers=0,
                      warmup_steps=1, run_dir=str(run)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2] and records[-1]["kind"] == "eval"

    result = zeroshot.main(["--checkpoint", str(run), "--data", str(small_demo.eval_dir), "--workers", "0"])
    assert result["model_kwargs"] == {"keep": 0.4} and 0 <= result["top1"] <= result["top5"] <= 1

    args = ["--batch-size", "2", "--repeats", "1", "--flops-images", "1", "--json"]
    pruned = profile.main(["--model", "normprune_vit_tiny_patch8_64", *args])
    plain = profile.main(["--model", "plain_vit_tiny_patch8_64", *args])
    assert pruned["gmacs"] < 0.8 * plain["gmacs"]

    align_train(AlignConfig(data_path=str(small_demo.llava_json), image_folder=str(small_demo.llava_images),
                            lm=str(demo_lm), encoder="normprune_vit_tiny_patch8_64", encoder_checkpoint=str(run),
                            batch_size=4, workers=0, max_steps=1, log_every=1, run_dir=str(tmp_path / "llava")))
    final = json.loads((tmp_path / "llava" / "final" / "llava_config.json").read_text())
    assert final["encoder_checkpoint"] == str(run)
    step = [json.loads(line) for line in (tmp_path / "llava" / "metrics.jsonl").read_text().splitlines()][0]
    assert step["step"] == 1 and torch.isfinite(torch.tensor(step["loss"]))
