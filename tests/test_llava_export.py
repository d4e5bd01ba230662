"""Export: the Hugging Face directory loads offline, with no dtpclip installed, and gives identical logits
and generations, with each image's own visual token count (remote code) or as stock LLaVA."""
import json
import subprocess
import sys

import pytest
import torch
from test_llava_model import tiny_lm, varying_dtp

from llava_bridge.conversation import IMAGE_TOKEN_INDEX, get_template
from llava_bridge.demo_lm import build_tokenizer
from llava_bridge.export import export_hf
from llava_bridge.model import LlavaModel, VisionTower

ENCODER_KWARGS = dict(embed_dim=32, depth=4, num_heads=2, compression=0.5)


# Run in a subprocess that cannot import dtpclip or llava_bridge: what a user without them has
NO_DTPCLIP = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("dtpclip", "llava_bridge"):
            raise ModuleNotFoundError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
"""
STOCK_PIPELINE = NO_DTPCLIP + """
from transformers import pipeline
pipe = pipeline("image-text-to-text", model=sys.argv[1])
messages = [{"role": "user", "content": [{"type": "image", "image": sys.argv[2]}, {"type": "text", "text": sys.argv[3]}]}]
out = pipe(text=messages, generate_kwargs={"max_new_tokens": 8, "do_sample": False}, return_full_text=False)
print(json.dumps([type(pipe.model).__name__, out[0]["generated_text"]]))
"""


REMOTE_LOAD = NO_DTPCLIP + """
import torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["images"]).logits
generated = model.generate(inputs["input_ids"], pixel_values=inputs["images"], max_new_tokens=5, do_sample=False,
                           pad_token_id=0)
torch.save({"class": type(model).__name__, "logits": logits, "generated": generated}, sys.argv[3])
"""


def remote_round_trip(model, config, tmp_path, images):
    """Export `model` as remote code, then load it and generate in a subprocess that cannot import dtpclip or
    llava_bridge; asserts the logits and generated tokens equal the model's own."""
    tokenizer = build_tokenizer(["a photo of the circle."] * 4, vocab_size=300)
    out, form = export_hf(model, tokenizer, get_template("plain"), config, tmp_path / "hf")
    assert form == "remote"  # auto: no stock form for these towers
    input_ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8]] * 3)
    with torch.no_grad():
        expected, _, counts = model(input_ids, torch.ones_like(input_ids), None, images)
    torch.save({"input_ids": input_ids, "images": images}, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(out), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "outputs.pt")
    assert got["class"] == "DtpLlavaForConditionalGeneration"
    assert torch.equal(got["logits"], expected)
    assert torch.equal(got["generated"], model.generate(input_ids, images, max_new_tokens=5, pad_token_id=0))
    return counts


def test_a_dtp_tower_exports_as_remote_code_that_runs_without_dtpclip(tmp_path, images):
    torch.manual_seed(0)
    model = LlavaModel(VisionTower(varying_dtp()), tiny_lm(), "mlp2x_gelu").eval()
    config = {"encoder": "dtp_vit_tiny_patch8_64", "model_kwargs": ENCODER_KWARGS, "select_layer": -1,
              "select_feature": "patch", "projector": "mlp2x_gelu", "max_length": 64,
              "tower_structure": {"transforms": [], "quantization": None}}
    counts = remote_round_trip(model, config, tmp_path, images)
    assert len(set(counts)) > 1  # each image's own token count survives the export


def test_a_merged_quantized_tower_exports_as_remote_code_that_runs_without_dtpclip(tmp_path, images):
    from conftest import TINY, tiny
    from dtpclip.encoders import apply_tome, quantize_model
    from dtpclip.encoders.quant import quant_config
    encoder = quantize_model(apply_tome(tiny("plain_vit_tiny_patch8_64"), r=8), 8, 8)
    model = LlavaModel(VisionTower(encoder), tiny_lm(), "mlp2x_gelu").eval()
    config = {"encoder": "plain_vit_tiny_patch8_64", "model_kwargs": TINY, "select_layer": -1,
              "select_feature": "patch", "projector": "mlp2x_gelu", "max_length": 64,
              "tower_structure": {"transforms": ["tome:r=8"], "quantization": quant_config(encoder)}}
    counts = remote_round_trip(model, config, tmp_path, images)
    assert counts == [64 - 8 * 4] * 3  # ToMe's r = 8 merges in each of the 4 blocks


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])  # LLaVA's default, and the demo's
def test_a_plain_tower_exports_as_stock_llava_that_answers_without_dtpclip(tmp_path, demo_lm, small_demo,
                                                                           select_feature):
    from conftest import tiny
    from PIL import Image
    from llava_bridge.build import image_transform, load_lm
    from llava_bridge.generate import answer_batch
    lm, tokenizer = load_lm(demo_lm)
    torch.manual_seed(0)
    tower = VisionTower(tiny("plain_vit_tiny_patch16_64"), select_layer=-2, select_feature=select_feature)
    model = LlavaModel(tower, lm, "mlp2x_gelu").eval()
    template = get_template("vicuna_v1")
    config = {"select_layer": -2, "select_feature": select_feature, "projector": "mlp2x_gelu",
              "image_aspect_ratio": "pad"}
    out, form = export_hf(model, tokenizer, template, config, tmp_path / "stock")
    assert form == "stock" and not any(out.glob("*.py"))
    image = sorted(small_demo.llava_images.rglob("*.jpg"))[0]
    with Image.open(image) as img:
        ours = answer_batch(model, tokenizer, template, image_transform(tower, "pad")(img.convert("RGB"))[None],
                            ["What is it?"], max_new_tokens=8)[0]
    done = subprocess.run([sys.executable, "-c", STOCK_PIPELINE, str(out), str(image), "What is it?"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model_class, answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert model_class == "LlavaForConditionalGeneration" and answer.strip() == ours and ours


def test_stock_export_is_refused_for_what_stock_llava_cannot_hold(tmp_path, images):
    model = LlavaModel(VisionTower(varying_dtp()), tiny_lm(), "mlp2x_gelu").eval()
    config = {"select_layer": -1, "select_feature": "patch", "projector": "mlp2x_gelu"}
    with pytest.raises(ValueError, match="its tower is DTPViT, not a plain ViT"):
        export_hf(model, None, get_template("plain"), config, tmp_path / "x", "stock")
