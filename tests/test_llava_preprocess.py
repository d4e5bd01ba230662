"""Our conversation tokenization equals LLaVA's preprocessing token for token, on a Llama-style tokenizer.

The reference below is LLaVA's algorithm (haotian-liu/LLaVA, llava/train/train.py: `preprocess_multimodal`,
`preprocess_plain`, `preprocess_v1`; llava/mm_utils.py: `tokenizer_image_token`), written out here on its own:
it masks by counting tokens of re-tokenized pieces, where ours checks each prompt/answer boundary.
"""
import io

import pytest
import sentencepiece
from transformers import LlamaTokenizer

from llava_bridge.conversation import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, TEMPLATES, tokenize_conversation

SYSTEM = TEMPLATES["vicuna_v1"].system
CORPUS = [SYSTEM, "USER: What is the shape? ASSISTANT: a red circle on a striped background", "a blue star",
          "Describe the image concisely.", "What colour is it? And its size?", "a small green heart"]


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no_bos"])
def llama_tokenizer(request, tmp_path_factory):
    """A sentencepiece BPE with byte fallback and Llama-2's tokenizer class (legacy, as LLaVA's Vicuna)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    folder = tmp_path_factory.mktemp("llama_tokenizer")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(folder, legacy=True, add_bos_token=request.param)


def llava_tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def llava_multimodal(turns):
    out = []
    for turn in turns:
        value = turn["value"]
        if IMAGE_TOKEN in value:
            value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append({**turn, "value": value})
    return out


def llava_plain(turns, tokenizer):
    prompt = IMAGE_TOKEN + turns[1]["value"] + "\n"
    ids = llava_tokenizer_image_token(prompt, tokenizer)
    masked = len(llava_tokenizer_image_token(IMAGE_TOKEN, tokenizer))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


def llava_v1(turns, tokenizer, has_image):
    prompt = SYSTEM
    for turn in turns:
        role = "USER" if turn["from"] == "human" else "ASSISTANT"
        prompt += f"{role}: {turn['value']}" + (" " if role == "USER" else "</s>")
    tokenize = (lambda text: llava_tokenizer_image_token(text, tokenizer)) if has_image else \
        (lambda text: tokenizer(text).input_ids)
    ids = tokenize(prompt)
    labels = list(ids)
    cursor, labels[0] = 1, IGNORE_INDEX
    for piece in prompt.split("</s>"):
        if not piece:
            break
        parts = piece.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        instruction = len(tokenize(parts[0] + " ASSISTANT: ")) - 2
        labels[cursor:cursor + instruction] = [IGNORE_INDEX] * instruction
        cursor += len(tokenize(piece))
    labels[cursor:] = [IGNORE_INDEX] * (len(labels) - cursor)
    if cursor != len(ids):
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels


def turns(*pairs):
    return [{"from": who, "value": text} for pair in pairs for who, text in zip(("human", "gpt"), pair)]


CASES = {
    "plain, image first": ("plain", turns(("<image>\nDescribe the image concisely.", "a red circle"))),
    "plain, image after": ("plain", turns(("Describe the image concisely.\n<image>", "a blue star"))),
    "v1, 1 turn, image first": ("vicuna_v1", turns(("<image>\nWhat is the shape?", "a red circle"))),
    "v1, 1 turn, image after": ("vicuna_v1", turns(("What is the shape?\n<image>", "a small green heart"))),
    "v1, 2 turns": ("vicuna_v1", turns(("What colour is it?\n<image>", "green"), ("And its size?", "small"))),
    "v1, 3 turns": ("vicuna_v1", turns(("<image>\nWhat is the shape?", "a heart"), ("What colour is it?", "green"),
                                       ("And its size?", "a small one"))),
    "v1, text only, 1 turn": ("vicuna_v1", turns(("Describe a star.", "a blue star"))),
    "v1, text only, 2 turns": ("vicuna_v1", turns(("What colour is it?", "red"), ("And its size?", "small"))),
}


@pytest.mark.parametrize("case", CASES)
def test_tokenization_equals_llavas_preprocessing(case, llama_tokenizer):
    template, conversation = CASES[case]
    has_image = any(IMAGE_TOKEN in turn["value"] for turn in conversation)
    sources = llava_multimodal(conversation) if has_image else conversation
    if template == "plain":
        expected_ids, expected_labels = llava_plain(sources, llama_tokenizer)
    else:
        expected_ids, expected_labels = llava_v1(sources, llama_tokenizer, has_image)
    ids, labels = tokenize_conversation(conversation, llama_tokenizer, TEMPLATES[template])
    assert ids.tolist() == expected_ids  # BOS only where the tokenizer adds it, as tokenizer_image_token
    if template == "plain" or llama_tokenizer.add_bos_token:  # v1's counting (cur_len = 1, len - 2) assumes BOS
        assert labels.tolist() == expected_labels
    assert (labels != IGNORE_INDEX).any()  # LLaVA's mismatch rule did not mask the whole sample
