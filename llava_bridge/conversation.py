"""Conversation templates and tokenization with label masking, after LLaVA's
`llava/conversation.py` (conv_llava_plain, conv_vicuna_v1) and `llava/train/train.py`
(`preprocess_plain`, `preprocess_v1`, `tokenizer_image_token`).

The image placeholder: as in LLaVA, `<image>` in the text becomes IMAGE_TOKEN_INDEX (-200) in
the input ids, never a vocabulary token, so any tokenizer works unchanged; the model replaces it
by the image's projected tokens. As LLaVA's `preprocess_multimodal` does, a turn holding `<image>`
gets it at its front, as `<image>\n` ("question\n<image>" reads as "<image>\nquestion"), and the
text starts with BOS only where the tokenizer itself adds one (`tokenizer_image_token`'s rule).

Masking: LLaVA tokenizes the whole conversation, then re-tokenizes the instruction parts to
count how many tokens to mask (with a -2 fudge for the Llama tokenizer) and, on a mismatch,
masks the whole sample with only a warning. Here every boundary between a prompt part and an
answer part is checked instead: the tokens of the text up to the boundary must be a prefix of
the tokens of the whole text. If a token straddles the boundary (e.g. a prompt ending in a
space that a byte-level BPE glues to the answer's first word), that is a ValueError naming the
template and the boundary.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's constant: the placeholder's id in input_ids
IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's ignore_index


@dataclass(frozen=True)
class Template:
    """One conversation format: system prefix, then per round a prompt part and a trained answer part.

    turn_prompt is formatted with {question}, turn_answer with {answer} and {eos} (the
    tokenizer's eos token). image_only: the human turn is reduced to `<image>` (LLaVA's 'plain').
    """

    name: str
    system: str
    turn_prompt: str
    turn_answer: str
    image_only: bool = False

    @property
    def answer_end(self) -> str:
        """Text that closes an answer besides EOS: the plain template's "\n" (its captions carry no EOS)."""
        return self.turn_answer.format(answer="", eos="")


TEMPLATES: Dict[str, Template] = {
    # stage 1: "<image>caption\n", loss on the caption (LLaVA conv_llava_plain, sep "\n")
    "plain": Template("plain", "", "{question}", "{answer}\n", image_only=True),
    # stage 2: "SYSTEM USER: q ASSISTANT: a</s>USER: ..." (LLaVA conv_vicuna_v1: sep " ", sep2 "</s>").
    # The space before the answer belongs to the answer part: byte-level and sentencepiece
    # tokenizers put it in the answer's first token.
    "vicuna_v1": Template(
        "vicuna_v1",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. ",
        "USER: {question} ASSISTANT:", " {answer}{eos}"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def image_first(text: str) -> str:
    """A turn with `<image>` as LLaVA's `preprocess_multimodal` writes it: `<image>\n` and then the rest, stripped."""
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def bos_ids(tokenizer) -> List[int]:
    """[BOS] where the tokenizer adds one to what it encodes (Llama's does, byte-level BPEs often do not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def tokenize_with_image(text: str, tokenizer) -> List[int]:
    """Token ids of `text` (no special tokens added) with each `<image>` as IMAGE_TOKEN_INDEX."""
    ids: List[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def conversation_parts(conversations: Sequence[dict], template: Template, eos: str) -> List[Tuple[str, bool]]:
    """LLaVA `conversations` ([{'from': 'human'|'gpt', 'value'}...]) as alternating (text, trained) parts."""
    if len(conversations) < 2 or len(conversations) % 2:
        raise ValueError(f"a conversation needs human/gpt pairs, got {len(conversations)} turns")
    parts = [(template.system, False)] if template.system else []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(f"turns {i} and {i + 1} must be from 'human' then 'gpt', got "
                             f"{human.get('from')!r} and {gpt.get('from')!r}")
        if IMAGE_TOKEN in gpt["value"]:
            raise ValueError(f"turn {i + 1} (gpt) contains {IMAGE_TOKEN}; images belong in human turns")
        question = image_first(human["value"])
        if template.image_only:
            if IMAGE_TOKEN not in question or len(conversations) != 2:
                raise ValueError(f"template {template.name!r} takes one human turn with {IMAGE_TOKEN} and one "
                                 f"answer (LLaVA 558K captions), got {len(conversations)} turns: {question!r}")
            question = IMAGE_TOKEN
        parts.append((template.turn_prompt.format(question=question), False))
        parts.append((template.turn_answer.format(answer=gpt["value"], eos=eos), True))
    merged = parts[:1]  # only a prompt/answer boundary must fall between tokens
    for text, trained in parts[1:]:
        if trained == merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


class TokenBoundaryError(ValueError):
    """A prompt/answer boundary falls inside a token; `input_ids` holds the conversation's ids all the same."""

    def __init__(self, message: str, input_ids: List[int]):
        super().__init__(message)
        self.input_ids = input_ids


def tokenize_conversation(conversations: Sequence[dict], tokenizer, template: Template):
    """(input_ids, labels) LongTensors; labels are IGNORE_INDEX on the system, prompts and images.

    Raises TokenBoundaryError when a prompt/answer boundary falls inside a token (see the module doc).
    """
    parts = conversation_parts(conversations, template, tokenizer.eos_token or "")
    bos = bos_ids(tokenizer)
    text = "".join(t for t, _ in parts)
    input_ids = bos + tokenize_with_image(text, tokenizer)
    labels = list(input_ids)
    prefix, start = "", 0  # bos goes with the first (prompt) part
    for part, trained in parts:
        prefix += part
        prefix_ids = bos + tokenize_with_image(prefix, tokenizer)
        end = len(prefix_ids)
        if input_ids[:end] != prefix_ids:
            raise TokenBoundaryError(
                f"template {template.name!r}: the boundary after {prefix[-40:]!r} falls inside a token "
                f"(the text up to it does not tokenize as a prefix of the whole conversation), so prompt "
                f"and answer tokens cannot be told apart; put the separator on the answer side", input_ids)
        if not trained:
            labels[start:end] = [IGNORE_INDEX] * (end - start)
        start = end
    return torch.tensor(input_ids), torch.tensor(labels)


def generation_prompt(question: str, template: Template) -> str:
    """The text before the first answer: what greedy generation continues."""
    question = IMAGE_TOKEN if template.image_only else image_first(question)
    return template.system + template.turn_prompt.format(question=question)


def prompt_ids(question: str, tokenizer, template: Template) -> List[int]:
    """Input ids of `generation_prompt(question)`, as training tokenizes the same text."""
    return bos_ids(tokenizer) + tokenize_with_image(generation_prompt(question, template), tokenizer)
