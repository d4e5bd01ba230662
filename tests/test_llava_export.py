"""Export: the Hugging Face directory loads offline through AutoModelForImageTextToText and gives
identical logits, with each image's own visual token count."""
import torch
from test_llava_model import tiny_lm, varying_dtp
from transformers import AutoModelForImageTextToText

from llava_bridge.conversation import IMAGE_TOKEN_INDEX
from llava_bridge.demo_lm import build_tokenizer
from llava_bridge.export import export_hf
from llava_bridge.model import LlavaModel, VisionTower

ENCODER_KWARGS = dict(embed_dim=32, depth=4, num_heads=2, compression=0.5)


def test_export_round_trip_gives_identical_logits(tmp_path, images):
    torch.manual_seed(0)
    model = LlavaModel(VisionTower(varying_dtp()), tiny_lm(), "mlp2x_gelu").eval()
    config = {"encoder": "dtp_vit_tiny_patch8_64", "model_kwargs": ENCODER_KWARGS, "select_layer": -1,
              "select_feature": "patch", "projector": "mlp2x_gelu", "max_length": 64,
              "tower_structure": {"transforms": [], "quantization": None}}
    export_hf(model, build_tokenizer(["a photo of the circle."] * 4, vocab_size=300), config, tmp_path / "hf")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(loaded).__name__ == "DtpLlavaForConditionalGeneration"
    input_ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8]] * 3)
    with torch.no_grad():
        expected, _, counts = model(input_ids, torch.ones_like(input_ids), None, images)
        got = loaded(input_ids=input_ids, pixel_values=images).logits
    assert len(set(counts)) > 1
    assert torch.equal(got, expected)
