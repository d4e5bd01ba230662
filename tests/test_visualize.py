"""Boundary and merge-group pictures: PNGs are written, and each method draws something different."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny
from dtpclip import visualize
from dtpclip.encoders.dtp import segment_ids


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(80, 64), (64, 96)]):  # not the model's size: the transform crops
        pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        pixels[:, : size[0] // 2] = rng.integers(0, 255, 3)  # two flat halves plus noise
        pixels[:, size[0] // 2:] = rng.integers(0, 255, 3)
        pixels = np.clip(pixels + rng.integers(0, 40, pixels.shape), 0, 255).astype(np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def test_segment_ids_are_the_exclusive_cumsum_of_boundaries():
    boundaries = torch.tensor([[0, 1, 0, 0, 1, 1, 0]])
    assert segment_ids(boundaries).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_draw_groups_tints_each_group_in_its_own_colour():
    image = np.zeros((4, 16, 3))
    image[:, 8:] = 1.0
    groups = np.array([[0, 0, 1, 1]])  # two groups of two 4x4 patches
    out = visualize.draw_groups(image, groups)
    assert out.shape == image.shape
    inside_a, inside_b = out[1:3, 1:3].reshape(-1, 3), out[1:3, 9:11].reshape(-1, 3)
    assert np.allclose(inside_a, inside_a[0]) and np.allclose(inside_b, inside_b[0])  # flat inside a group
    assert not np.allclose(inside_a[0] - 0.0, inside_b[0] - 1.0)  # different tints, not only the image
    assert not np.allclose(out[:, 7], out[1, 1])  # the border is drawn


def test_each_method_writes_a_titled_png(image_files, tmp_path):
    dtp = tiny("dtp_vit_tiny_patch8_64")
    with torch.no_grad():
        dtp.boundary_predictor.mlp[-1].bias.fill_(0.0)  # about half the patches close a segment
    written = {"dtp": visualize.render(dtp, image_files, tmp_path / "out", display_size=128)}
    for spec in ("tome:r=8", "lgtm:r=8,dense=1,local=2"):
        written[spec[:4]] = visualize.render(tiny(), image_files, tmp_path / "out", [spec], display_size=128)
    text = {}
    for method, paths in written.items():
        assert [p.name for p in paths] == [f"img0_{method}.png", f"img1_{method}.png"]
        text[method] = Image.open(paths[0]).text
    dtp_panels = text["dtp"]["Description"].split(" | ")
    assert text["dtp"]["Title"] == "dtp_vit_tiny_patch8_64: img0.png" and len(dtp_panels) == 3
    assert re.fullmatch(r"\d+ token groups of 64 patches \(one colour each\)", dtp_panels[1])
    assert re.fullmatch(r"red: the \d+ patches that close a segment", dtp_panels[2])
    assert text["tome"]["Title"] == "plain_vit_tiny_patch8_64 tome:r=8,prop_attn=True: img0.png"
    tome_groups = int(text["tome"]["Description"].split(" | ")[1].split()[0])
    assert tome_groups == 64 - 4 * 8 + 1 - 1 and text["lgtm"]["Description"] != text["tome"]["Description"]
    pictures = {m: np.asarray(Image.open(p[0]).convert("RGB"), dtype=np.int32) for m, p in written.items()}
    assert np.abs(pictures["tome"] - pictures["lgtm"]).sum() > 0


def test_cli_takes_flags_and_a_config_file(image_files, tmp_path):
    config = tmp_path / "vis.yaml"
    config.write_text("transform: ['lgtm:r=4,dense=1']\n")
    written = visualize.main(["--config", str(config), "--model", "plain_vit_tiny_patch8_64",
                              "--images", *image_files, "--out", str(tmp_path / "cli"), "--display-size", "64"])
    assert [p.name for p in written] == ["img0_lgtm.png", "img1_lgtm.png"] and all(p.is_file() for p in written)


def test_bad_inputs_are_clear_errors(image_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png' does not exist"):
        visualize.render(tiny(), ["nope.png"], tmp_path)
    with pytest.raises(ValueError, match="unknown transform 'dtp'"):
        visualize.render(tiny(), image_files, tmp_path, ["dtp"])
    with pytest.raises(TypeError, match="does not apply to DTPViT"):
        visualize.render(tiny("dtp_vit_tiny_patch8_64"), image_files, tmp_path, ["tome:r=4"])
