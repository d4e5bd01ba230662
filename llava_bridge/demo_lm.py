"""The demo's language model: a tiny Llama and a byte-level BPE tokenizer, built offline.

LLaVA aligns a projector to an LM that already knows language; so that the demo's caption loss
means the same thing, the tiny Llama (hidden 64, 2 layers, 4 heads) is first trained for a
thousand steps as a plain LM on the demo captions and conversations, and on each record as the
stages tokenize it with the subject's name in the image's place (`samples`; about 150 s on one
CPU core). Tokenizer and model are saved with `save_pretrained` under
$DTPCLIP_LLAVA_LM_DIR or ~/.cache/dtpclip/llava_demo_lm, in a directory named by the content it is
built from (the data file's bytes, the recipe), so an LM a run was trained with is never rebuilt
in place by another; they load back with `from_pretrained(path)` like any local LM. Building is
seeded, idempotent (a marker written last) and guarded by a file lock, so several ranks wait for one.
The tokenizer adds BOS to what it encodes, as Llama's does.
"""
import fcntl
import functools
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dtpclip.cli import status
from dtpclip.demo_data import CLASSNAMES
from llava_bridge.conversation import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, TEMPLATES, tokenize_conversation

ENV_VAR = "DTPCLIP_LLAVA_LM_DIR"
MARKER = "COMPLETE.json"
VERSION = 5
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
LM_CONFIG = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)


def default_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "dtpclip" / "llava_demo_lm")


def build_tokenizer(texts: Sequence[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2 / Llama 3) trained on `texts`; bos <s> (added when encoding), eos </s>, pad <pad>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=LM_CONFIG["max_position_embeddings"])


def build_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LM_CONFIG)
    return LlamaForCausalLM(config)


def subject_of(caption: str) -> Optional[str]:
    return next((name for name in CLASSNAMES if re.search(rf"\b{name}\b", caption)), None)


def question_caption(record: dict) -> Tuple[str, str]:
    human, gpt = record["conversations"][:2]
    return human["value"].replace(IMAGE_TOKEN, "").strip(), gpt["value"]


def texts(records: Sequence[dict]) -> List[str]:
    """The demo's language as text (what the tokenizer learns): each caption alone and as a vicuna_v1 answer."""
    vicuna = TEMPLATES["vicuna_v1"]
    out = []
    for question, caption in map(question_caption, records):
        out.append(caption + "\n")
        out.append(vicuna.system + vicuna.turn_prompt.format(question=question)
                   + vicuna.turn_answer.format(answer=caption, eos=""))
    return out


def fill_image(input_ids: Sequence[int], slot: Sequence[int]) -> Tuple[List[int], List[int]]:
    """(ids, labels): the image placeholder replaced by `slot`, whose positions take no loss, as stage 1's image
    tokens take none; every text token is learnt."""
    ids, labels = [], []
    for token in input_ids:
        ids += list(slot) if token == IMAGE_TOKEN_INDEX else [token]
        labels += [IGNORE_INDEX] * len(slot) if token == IMAGE_TOKEN_INDEX else [token]
    return ids, labels


def samples(records: Sequence[dict], tokenizer, seed: int = 0) -> List[Tuple[List[int], List[int]]]:
    """(ids, labels) the demo LM learns: per record its text without the image (caption; vicuna_v1 conversation),
    and the same two as stage 1 and 2 tokenize them with the image, the image's place holding the subject's name
    1 to 16 times (the visual tokens a demo tower gives: DTP about 5, a plain ViT-Ti/16 16). The second teaches what
    a real LM knows and a 2-layer one trained on captions alone does not: to take the subject from where the
    projected image tokens will stand. Those positions take no loss, as in stage 1, so the LM never learns to
    continue a run of names (it answered "heart heart heart ... a photo of the heart" when it did)."""
    rng = random.Random(seed)
    eos = [tokenizer.eos_token_id]

    # a data set repeats its few prompts and captions: each text is tokenized once
    @functools.lru_cache(maxsize=None)
    def caption_ids(caption: str) -> List[int]:
        return tokenizer(caption + "\n")["input_ids"] + eos

    @functools.lru_cache(maxsize=None)
    def tokenized(human: str, gpt: str, template: str) -> List[int]:
        ids = tokenize_conversation([{"from": "human", "value": human}, {"from": "gpt", "value": gpt}], tokenizer,
                                    TEMPLATES[template])[0].tolist()
        return ids + eos if TEMPLATES[template].image_only else ids  # plain answers carry no eos of their own

    out = []
    for record in records:
        question, caption = question_caption(record)
        plain_text, vicuna_text = caption_ids(caption), tokenized(question, caption, "vicuna_v1")
        out += [(plain_text, plain_text), (vicuna_text, vicuna_text)]
        subject = subject_of(caption)
        if subject is None:
            continue
        slot = tokenizer(" ".join([subject] * rng.randint(1, 16)), add_special_tokens=False)["input_ids"]
        human = record["conversations"][0]["value"]
        out += [fill_image(tokenized(human, caption, template), slot) for template in ("plain", "vicuna_v1")]
    return out


def pretrain_lm(model, tokenizer, data: Sequence[Tuple[List[int], List[int]]], steps: int, batch_size: int = 32,
                lr: float = 3e-3, seed: int = 0) -> List[float]:
    """Next-token training on `data` ((ids, labels) pairs, right-padded per batch); returns the loss per step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="demo LM pre-training", unit="step"):
        batch = rng.sample(data, batch_size)
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), IGNORE_INDEX)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, :len(ids)], labels[row, :len(ids)] = torch.tensor(ids), torch.tensor(lab)
            attention_mask[row, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def ensure_demo_lm(root: Optional[os.PathLike] = None, llava_json: Optional[os.PathLike] = None,
                   steps: int = 1000) -> Path:
    """The demo LM directory (tokenizer + model, `from_pretrained`-loadable) for `llava_json`: `root` (default:
    `default_dir()`) / a digest of the data and the recipe; built if missing, never rebuilt in place."""
    if llava_json is None:
        from dtpclip.demo_data import ensure_demo_data
        llava_json = ensure_demo_data().llava_json
    wanted = {"version": VERSION, "steps": steps, "config": LM_CONFIG,
              "data_sha256": hashlib.sha256(Path(llava_json).read_bytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]
    root = (Path(root) if root is not None else default_dir()) / digest
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / MARKER).is_file():
            return root
        records = json.loads(Path(llava_json).read_text())
        status(f"building the demo LM into {root}: a tokenizer and a tiny Llama trained {steps} steps on the demo "
               "captions (once per data set)")
        tokenizer = build_tokenizer(texts(records))
        model = build_model(tokenizer)
        losses = pretrain_lm(model, tokenizer, samples(records, tokenizer), steps)
        staging = root.with_name(root.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        (staging / "pretrain_losses.json").write_text(json.dumps({"first": losses[:5], "last": losses[-5:]}))
        (staging / MARKER).write_text(json.dumps(wanted))
        os.replace(staging, root)  # whole or not at all: an existing root was returned above
    return root
