"""The accuracy-vs-compute sweep: merging lines on a plain CLIP, trained points, json + png."""
import json

import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from dtpclip import profile
from dtpclip.evalsets import load_eval_set
from dtpclip.pareto import transform_sweep


def save_clip(directory, name: str, seed: int):
    torch.manual_seed(seed)
    clip = open_clip.create_model(name)
    directory.mkdir()
    save_file(clip.state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model": name}))
    return directory


def test_pareto_writes_merging_lines_and_trained_points(tmp_path, small_demo):
    plain = save_clip(tmp_path / "plain", "PlainViT-Ti-8-64", 0)
    dtp = save_clip(tmp_path / "dtp", "DTP-ViT-Ti-8-64-4x", 1)
    points = profile.main(["--pareto", str(tmp_path / "out"), "--checkpoint", str(plain), "--points", str(dtp),
                           "--sweep", "tome:r=4", "tome:r=8", "lgtm:r=4", "lgtm:r=8", "--eval-data", str(small_demo.eval_dir)])
    saved = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert saved == points and (tmp_path / "out" / "pareto.png").stat().st_size > 10_000
    text = Image.open(tmp_path / "out" / "pareto.png").text
    assert text["Title"].startswith("Zero-shot top-1 against compute on ")
    assert text["Description"] == "ToMe | DFE + LGTM | PlainViT-Ti-8-64 | DTP-ViT-Ti-8-64-4x"
    by = {(p["method"], p["r"]): p for p in points}
    assert [p["label"] for p in points if p["method"] == "trained"] == ["PlainViT-Ti-8-64", "DTP-ViT-Ti-8-64-4x"]
    plain_macs = points[0]["gmacs"]
    assert by[("tome", 8)]["gmacs"] < by[("tome", 4)]["gmacs"] < plain_macs
    assert by[("tome", 4)]["gmacs"] < by[("lgtm", 4)]["gmacs"] < plain_macs  # LGTM keeps 2 layers dense
    assert by[("tome", 8)]["tokens_out"] == 65 - 6 * 8 and by[("lgtm", 8)]["tokens_out"] > 17
    assert all(0 <= p["top1"] <= p["top5"] <= 1 for p in points)


def test_transform_sweep_leaves_the_clip_unpatched(small_demo):
    torch.manual_seed(0)
    clip = open_clip.create_model("PlainViT-Ti-8-64").eval()
    eval_set = load_eval_set(small_demo.eval_dir, open_clip.image_transform(64, is_train=False))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = clip.encode_image(images)
        points = transform_sweep(clip, open_clip.get_tokenizer("PlainViT-Ti-8-64"), eval_set, ["tome:r=0", "tome:r=4"])
        assert torch.equal(clip.encode_image(images), before)
    assert not hasattr(clip.visual.trunk, "_tome_info") and points[0]["tokens_out"] == 65
