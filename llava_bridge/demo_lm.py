"""The demo's language model: a tiny Llama and a byte-level BPE tokenizer, built offline.

LLaVA aligns a projector to an LM that already knows language; so that the demo's caption loss
means the same thing, the tiny Llama (hidden 64, 2 layers, 4 heads) is first trained for a few
hundred steps as a plain LM on the demo captions and the conversation templates' text (a
minute on one CPU core). Tokenizer and model are saved with `save_pretrained` under
$DTPCLIP_LLAVA_LM_DIR or ~/.cache/dtpclip/llava_demo_lm, in a directory named by the content it is
built from (the data file's bytes, the recipe), so an LM a run was trained with is never rebuilt
in place by another; they load back with `from_pretrained(path)` like any local LM. Building is
seeded, idempotent (a marker written last) and guarded by a file lock, so several ranks wait for one.
The tokenizer adds BOS to what it encodes, as Llama's does.
"""
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dtpclip.cli import status
from dtpclip.demo_data import CLASSNAMES
from llava_bridge.conversation import TEMPLATES

ENV_VAR = "DTPCLIP_LLAVA_LM_DIR"
MARKER = "COMPLETE.json"
VERSION = 4
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


def corpus(captions: Sequence[str], prompts: Sequence[str]) -> List[str]:
    """Texts the demo LM learns: the captions in both templates' answer form with the prompts, each once as it is
    and once with its subject's name where the image goes. The second teaches what a real LM knows and a 2-layer
    one trained on captions alone does not: to take the subject from earlier in the context, where stage 1's
    projected image tokens stand (without it, the frozen demo LM captions every image alike)."""
    vicuna = TEMPLATES["vicuna_v1"]
    rng = random.Random(0)
    texts = []
    for prompt, caption in zip(prompts, captions):
        subject = next((name for name in CLASSNAMES if re.search(rf"\b{name}\b", caption)), None)
        # the name as often as an image gives tokens (a few to a dozen): a run of look-alike positions
        named = " ".join([subject] * rng.randint(1, 12)) if subject else None
        for image in ["", named] if named else [""]:
            texts.append(f"{image} {caption}\n" if image else caption + "\n")
            question = f"{image}\n{prompt}" if image else prompt
            texts.append(vicuna.system + vicuna.turn_prompt.format(question=question)
                         + vicuna.turn_answer.format(answer=caption, eos=""))
    return texts


def pretrain_lm(model, tokenizer, texts: Sequence[str], steps: int, batch_size: int = 32, lr: float = 3e-3,
                seed: int = 0) -> List[float]:
    """Plain next-token training on `texts` (bos + text + eos); returns the loss per step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="demo LM pre-training", unit="step"):
        batch = tokenizer([tokenizer.bos_token + t + tokenizer.eos_token for t in rng.sample(texts, batch_size)],
                          add_special_tokens=False, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
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
        captions = [r["conversations"][1]["value"] for r in records]
        prompts = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
        texts = corpus(captions, prompts)
        status(f"building the demo LM into {root}: a tokenizer and a tiny Llama trained {steps} steps on the demo "
               "captions (once per data set)")
        tokenizer = build_tokenizer(texts)
        model = build_model(tokenizer)
        losses = pretrain_lm(model, tokenizer, texts, steps)
        staging = root.with_name(root.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        (staging / "pretrain_losses.json").write_text(json.dumps({"first": losses[:5], "last": losses[-5:]}))
        (staging / MARKER).write_text(json.dumps(wanted))
        os.replace(staging, root)  # whole or not at all: an existing root was returned above
    return root
