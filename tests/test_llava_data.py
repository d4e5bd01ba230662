"""LLaVA json data: image and text-only records in one batch; placeholder/image mismatches are named."""
import dataclasses
import json

import pytest
import torch
from torchvision import transforms

from llava_bridge.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, get_template
from llava_bridge.data import LlavaCollator, LlavaJsonDataset
from llava_bridge.demo_lm import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["a photo of the circle.", "USER: what is it? ASSISTANT: a red square."] * 8, 300)


def write(tmp_path, small_demo, tokenizer, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return LlavaJsonDataset(path, small_demo.llava_images, tokenizer, get_template("vicuna_v1"), transforms.ToTensor())


def test_image_and_text_only_records_collate_together(tmp_path, small_demo, tokenizer):
    demo = json.loads(small_demo.llava_json.read_text())[0]
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "what is it?"},
                                              {"from": "gpt", "value": "a red square."}] * 2}
    dataset = write(tmp_path, small_demo, tokenizer, [demo, text_only])
    samples = [dataset[0], dataset[1]]
    assert samples[1]["image"] is None and samples[0]["image"].shape == (3, 64, 64)
    batch = LlavaCollator(tokenizer.pad_token_id)(samples)
    lengths = [s["input_ids"].shape[0] for s in samples]
    assert batch["images"].shape == (1, 3, 64, 64)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = min(range(2), key=lambda i: lengths[i])
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, lengths[short]:] == tokenizer.pad_token_id).all()
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1).tolist() == [1, 0]
    assert torch.equal(batch["labels"][1, :lengths[1]], samples[1]["labels"])


def test_image_without_placeholder_is_named_before_training(tmp_path, small_demo, tokenizer):
    record = {"id": "x7", "image": "missing.jpg", "conversations": [{"from": "human", "value": "what is it?"},
                                                                  {"from": "gpt", "value": "a circle."}]}
    with pytest.raises(ValueError, match=r"record 0 \(id 'x7'\) has 0 <image> placeholders and an image"):
        write(tmp_path, small_demo, tokenizer, [record])


def test_a_sample_that_cannot_train_is_masked_and_counted_not_fatal(tmp_path, small_demo, tokenizer):
    demo = json.loads(small_demo.llava_json.read_text())[0]
    broken = tmp_path / "images" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    records = [demo, {**demo, "id": "bad", "image": str(broken)}]
    dataset = write(tmp_path, small_demo, tokenizer, records)
    good, bad = dataset[0], dataset[1]
    assert (good["labels"] != IGNORE_INDEX).any()
    assert (bad["labels"] == IGNORE_INDEX).all() and bad["image"].shape[0] == 3  # a black stand-in, transformed
    counts = dataset.counts.snapshot()
    assert counts.seen == 2 and counts.skipped == {"untokenizable": 0, "undecodable_image": 1}
    # the separator on the prompt side: byte-level BPE glues the space to the answer's first word
    glued = dataclasses.replace(get_template("vicuna_v1"), turn_prompt="USER: {question} ASSISTANT: ",
                                turn_answer="{answer}{eos}")
    dataset = LlavaJsonDataset(tmp_path / "data.json", small_demo.llava_images, tokenizer, glued, transforms.ToTensor())
    sample = dataset[0]
    assert (sample["labels"] == IGNORE_INDEX).all() and sample["input_ids"].numel() > 0
    assert dataset.counts.snapshot().skipped["untokenizable"] == 1
