"""Templates: exact label positions for 'plain' and 'vicuna_v1', and the boundary check."""
import dataclasses

import pytest

from llava_bridge.conversation import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, TEMPLATES, get_template,
                                       tokenize_conversation, tokenize_with_image)
from llava_bridge.demo_lm import build_tokenizer

CAPTIONS = ["a photo of the circle.", "the red square shape.", "a drawing of the star.", "an image of the ring."]


@pytest.fixture(scope="module")
def tokenizer():
    vicuna = TEMPLATES["vicuna_v1"]
    texts = [c + "\n" for c in CAPTIONS] + [vicuna.system + "USER: what is it? ASSISTANT: " + c for c in CAPTIONS]
    return build_tokenizer(texts * 4, vocab_size=400)


def turns(*pairs):
    return [{"from": who, "value": text} for pair in pairs for who, text in zip(("human", "gpt"), pair)]


def test_plain_trains_exactly_the_caption_and_newline(tokenizer):
    ids, labels = tokenize_conversation(turns(("Describe it.\n<image>", "a photo of the circle.")), tokenizer,
                                        get_template("plain"))
    caption = tokenizer("a photo of the circle.\n", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX] + caption  # the instruction is dropped
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX] + caption


def test_vicuna_trains_exactly_each_answer_and_its_eos(tokenizer):
    conversation = turns(("<image>\nwhat is it?", "a photo of the circle."), ("and now?", "the red square shape."))
    ids, labels = tokenize_conversation(conversation, tokenizer, get_template("vicuna_v1"))
    trained = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    answer_1 = tokenizer(" a photo of the circle.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_2 = tokenizer(" the red square shape.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_1 = [tokenizer.bos_token_id] + tokenize_with_image(
        TEMPLATES["vicuna_v1"].system + "USER: <image>\nwhat is it? ASSISTANT:", tokenizer)
    prompt_2 = tokenizer("USER: and now? ASSISTANT:", add_special_tokens=False)["input_ids"]
    start_2 = len(prompt_1) + len(answer_1) + len(prompt_2)
    assert trained == list(range(len(prompt_1), len(prompt_1) + len(answer_1))) + \
        list(range(start_2, start_2 + len(answer_2)))
    assert ids.tolist() == prompt_1 + answer_1 + prompt_2 + answer_2
    assert labels[trained].tolist() == answer_1 + answer_2
    assert ids.tolist().count(IMAGE_TOKEN_INDEX) == 1 and labels[ids == IMAGE_TOKEN_INDEX].item() == IGNORE_INDEX


def test_boundary_inside_a_token_raises(tokenizer):
    # LLaVA's own split: the prompt keeps the space, but byte-level BPE glues it to the answer's first word
    llava_split = dataclasses.replace(TEMPLATES["vicuna_v1"], turn_prompt="USER: {question} ASSISTANT: ",
                                      turn_answer="{answer}{eos}")
    with pytest.raises(ValueError, match="falls inside a token"):
        tokenize_conversation(turns(("<image>\nwhat is it?", "a photo of the circle.")), tokenizer, llava_split)


def test_plain_needs_an_image_and_unknown_template_is_named(tokenizer):
    with pytest.raises(ValueError, match="template 'plain' takes one human turn with <image>"):
        tokenize_conversation(turns(("what is it?", "a circle.")), tokenizer, get_template("plain"))
    with pytest.raises(ValueError, match="unknown conversation template 'llama_2'"):
        get_template("llama_2")


def test_text_only_records_tokenize_without_placeholder(tokenizer):
    ids, labels = tokenize_conversation(turns(("what is it?", "a circle.")), tokenizer, get_template("vicuna_v1"))
    assert IMAGE_TOKEN_INDEX not in ids.tolist()
    assert (labels != IGNORE_INDEX).sum() == len(tokenizer(" a circle.", add_special_tokens=False)["input_ids"]) + 1
