"""LLaVA json datasets and their collator (LLaVA's `LazySupervisedDataset` and
`DataCollatorForSupervisedDataset`, llava/train/train.py).

A record is {"id", "image" (relative to the image folder; absent for text-only records),
"conversations": [{"from": "human"|"gpt", "value"}...]}: the 558K pretraining captions
(one human turn with `<image>`, one answer) and the 665K multi-turn instruction data alike.

A record that cannot be read is found before training (`_check`). Within training, as LLaVA does
with a tokenization mismatch, a sample whose prompt/answer boundary falls inside a token, or whose
image does not decode (then a black image stands in), is masked (no label trains) and counted
by reason in a `SampleCounts` shared by the DataLoader workers; the first of each is logged.
"""
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from PIL import Image
from torch.utils.data import Dataset

from dtpclip.data import DECODE_ERRORS, SampleCounts
from llava_bridge.conversation import IGNORE_INDEX, IMAGE_TOKEN, Template, TokenBoundaryError, tokenize_conversation

MASK_REASONS = ("untokenizable", "undecodable_image")


def read_records(json_path) -> List[dict]:
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data {str(path)!r} does not exist (expected a json list of "
                                "{'id', 'image', 'conversations'} records)")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"LLaVA data {str(path)!r} is not valid json: {e}") from e
    if not isinstance(records, list) or not records:
        raise ValueError(f"LLaVA data {str(path)!r} must be a non-empty json list of records")
    return records


class LlavaJsonDataset(Dataset):
    """One tokenized conversation per record, with its image as a tensor (None when text-only)."""

    def __init__(self, json_path, image_folder, tokenizer, template: Template, transform: Callable,
                 max_samples: Optional[int] = None):
        self.records = read_records(json_path)[:max_samples]
        self.image_folder, self.tokenizer, self.template = Path(image_folder), tokenizer, template
        self.transform = transform
        self.source = str(json_path)
        self.counts = SampleCounts(MASK_REASONS)
        for index, record in enumerate(self.records):  # before training: a bad record is not found mid-run
            self._check(index, record)

    def _check(self, index: int, record) -> None:
        where = f"{self.source} record {index}" + (f" (id {record.get('id')!r})" if isinstance(record, dict) else "")
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not turns or not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") for t in turns):
            raise ValueError(f"{where} has no 'conversations' list of {{'from', 'value'}} turns")
        placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        if placeholders != int("image" in record):
            raise ValueError(f"{where} has {placeholders} {IMAGE_TOKEN} placeholders and "
                             f"{'an' if 'image' in record else 'no'} image; expected one placeholder with an image, "
                             "or none without")
        if "image" in record and not (self.image_folder / str(record["image"])).is_file():
            raise FileNotFoundError(f"{where}: image {str(self.image_folder / str(record['image']))!r} does not "
                                    f"exist (paths are relative to the image folder {str(self.image_folder)!r})")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> List[int]:
        """Per record its words, negative when text-only (LLaVA's modality_lengths, for group_by_modality_length)."""
        lengths = []
        for record in self.records:
            words = sum(len(turn["value"].split()) for turn in record["conversations"])
            lengths.append(words if "image" in record else -words)
        return lengths

    def __getitem__(self, index: int) -> Dict[str, Optional[torch.Tensor]]:
        record = self.records[index]
        where = f"{self.source} record {index} (id {record.get('id')!r})"
        self.counts.add_seen()
        try:
            input_ids, labels = tokenize_conversation(record["conversations"], self.tokenizer, self.template)
        except TokenBoundaryError as e:
            self.counts.skip("untokenizable", where, e)
            input_ids = torch.tensor(e.input_ids)
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        image = None
        if "image" in record:
            try:
                with Image.open(self.image_folder / record["image"]) as img:
                    image = self.transform(img.convert("RGB"))
            except DECODE_ERRORS as e:
                self.counts.skip("undecodable_image", where, e)
                image = self.transform(Image.new("RGB", (8, 8)))
                labels = torch.full_like(input_ids, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "image": image}


class LlavaCollator:
    """Right-pads ids (pad id) and labels (IGNORE_INDEX); stacks the images of the samples that have one."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: List[dict]) -> Dict[str, Optional[torch.Tensor]]:
        length = max(s["input_ids"].shape[0] for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = s["input_ids"].shape[0]
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = s["input_ids"], s["labels"], 1
        images = [s["image"] for s in samples if s["image"] is not None]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "images": torch.stack(images) if images else None}
