"""`python -m dtpclip.export`: checkpoints in the layouts open_clip's and timm's `local-dir:` loaders read, exact."""
import os
import subprocess
import sys

import open_clip
import pytest
import timm
import torch

from dtpclip.checkpoint import save_checkpoint_dir
from dtpclip.clip import create_clip_and_transforms
from dtpclip.export import main, save_pretrained
from dtpclip.factory import apply_transforms, create_encoder

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_a_clip_checkpoint_loads_by_local_dir_in_open_clip_and_timm(tmp_path):
    torch.manual_seed(0)
    clip = create_clip_and_transforms("DTP-ViT-Ti-8-64-4x")[0].eval()
    save_checkpoint_dir(clip, tmp_path / "ckpt", {"model": "DTP-ViT-Ti-8-64-4x"})
    main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hub")])
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    encoder = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode_image(IMAGES), clip.encode_image(IMAGES))
        assert torch.equal(encoder.encode(IMAGES).pooled, clip.visual.trunk.encode(IMAGES).pooled)
    assert preprocess.transforms[0].size == 64 and encoder.pretrained_cfg["input_size"] == (3, 64, 64)


def test_an_encoder_keeps_its_constructor_args_for_timm(tmp_path):
    encoder = create_encoder("dtp_vit_tiny_patch8_64", compression=0.2, pre_layers=3).eval()
    save_pretrained(encoder, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.boundary_predictor.prior == 0.2 and loaded.pre_layers == 3
    with torch.no_grad():
        assert torch.equal(loaded.encode(IMAGES).tokens, encoder.encode(IMAGES).tokens)


@pytest.mark.parametrize("case, message", [
    ("clip_with_kwargs", "open_clip builds the image tower by name only"),
    ("transformed", "changed after construction"),
    ("not_empty", "is not empty"),
])
def test_what_timm_or_open_clip_cannot_rebuild_is_refused(tmp_path, case, message):
    if case == "clip_with_kwargs":
        model = create_clip_and_transforms("DTP-ViT-Ti-8-64", model_kwargs={"compression": 0.2})[0]
    elif case == "transformed":
        model = create_encoder("plain_vit_tiny_patch8_64")
        apply_transforms(model, ["tome:r=2"])
    else:
        model = create_encoder("plain_vit_tiny_patch8_64")
        (tmp_path / "notes.txt").write_text("someone else's")
    with pytest.raises((ValueError, FileExistsError), match=message):
        save_pretrained(model, tmp_path)


def test_run_gives_another_tools_module_our_names(tmp_path):
    (tmp_path / "probe.py").write_text("import sys, open_clip, timm\n"
                                       "print('DTP-ViT-B-32-4x' in open_clip.list_models(), "
                                       "'dtp_vit_base_patch32_224' in timm.list_models(), sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "dtpclip.run", "probe", "--flag", "x"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True True ['--flag', 'x']"
