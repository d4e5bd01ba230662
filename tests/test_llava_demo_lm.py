"""The demo LM's pre-training samples: each text as it is, and each record as stage 1 and 2 tokenize it with the
subject's name where the image goes, those positions taking no loss (as the image tokens take none in stage 1)."""
import pytest

from llava_bridge.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TEMPLATES, tokenize_conversation
from llava_bridge.demo_lm import build_tokenizer, samples, texts


def record(question: str, caption: str) -> dict:
    return {"id": "0", "image": "0.jpg", "conversations": [{"from": "human", "value": question},
                                                           {"from": "gpt", "value": caption}]}


RECORDS = [record("Describe it.\n<image>", "a photo of the circle."), record("<image>\nWhat is it?", "the star shape."),
           record("Describe it.\n<image>", "an image of the ring.")]
SUBJECTS = ["circle", "star", "ring"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(texts(RECORDS) * 4, vocab_size=400)


def test_texts_without_an_image_are_learnt_whole(tokenizer):
    (plain, plain_labels), (vicuna, vicuna_labels) = samples(RECORDS[:1], tokenizer)[:2]
    assert plain == tokenizer("a photo of the circle.\n")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(vicuna, skip_special_tokens=True).endswith("USER: Describe it. ASSISTANT: a photo of the "
                                                                       "circle.")
    assert plain_labels == plain and vicuna_labels == vicuna


@pytest.mark.parametrize("index, subject", enumerate(SUBJECTS))
def test_the_image_place_holds_the_subject_laid_out_as_stage_1_and_2_tokenize_it_and_takes_no_loss(tokenizer, index,
                                                                                                  subject):
    with_image = samples(RECORDS, tokenizer)[4 * index + 2: 4 * index + 4]
    for (ids, labels), template in zip(with_image, (TEMPLATES["plain"], TEMPLATES["vicuna_v1"])):
        staged = tokenize_conversation(RECORDS[index]["conversations"], tokenizer, template)[0].tolist()
        staged += [tokenizer.eos_token_id] if template.image_only else []
        at, after = staged.index(IMAGE_TOKEN_INDEX), len(staged) - staged.index(IMAGE_TOKEN_INDEX) - 1
        slot = slice(at, len(ids) - after)
        # the text around the image exactly as the stages feed it (the caption unspaced after a plain image)
        assert ids[:at] == staged[:at] and ids[slot.stop:] == staged[at + 1:]
        assert set(tokenizer.decode(ids[slot]).split()) == {subject}
        assert labels[slot] == [IGNORE_INDEX] * (slot.stop - at)  # the LM never learns to continue a run of names
        assert labels[:at] + labels[slot.stop:] == ids[:at] + ids[slot.stop:]
