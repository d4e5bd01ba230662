"""Greedy generation for a quick look at a trained model:

    python -m llava_bridge.generate --checkpoint RUN/final --image IMG --prompt "Describe the image."

The prompt is put in the model's template ('plain' models see only the image, as in LLaVA's
stage 1; 'vicuna_v1' ones the system text, `USER: <image>\\nprompt ASSISTANT:`).
"""
from dtpclip.cli import early_args, make_parser, parse_args, run_main


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m llava_bridge.generate")
    parser.add_argument("--checkpoint", required=True, help="a llava_align run directory or its final/")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", default="Describe the image concisely.", help="the question")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation length cap")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

from pathlib import Path  # noqa: E402  (after the early parse, as every import below)
from typing import List, Sequence

import torch
from PIL import Image

from llava_bridge.build import load_trained, trained_transform
from llava_bridge.conversation import IMAGE_TOKEN, Template, prompt_ids


def answer_batch(model, tokenizer, template: Template, images: torch.Tensor, questions: Sequence[str],
                 max_new_tokens: int = 32) -> List[str]:
    """Greedy answers to `questions` about `images` (one each), generated as one batch: the prompts are
    left-padded, so each answer is the one its sample gets alone."""
    prompts = [prompt_ids(f"{IMAGE_TOKEN}\n{question}", tokenizer, template) for question in questions]
    length = max(map(len, prompts))
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids):], attention_mask[row, length - len(ids):] = torch.tensor(ids), 1
    new = model.generate(input_ids, images, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    answers = [tokenizer.decode(row, skip_special_tokens=True) for row in new]
    end = template.answer_end.strip(" ")
    return [(answer.split(end)[0] if end else answer).strip() for answer in answers]


def generate(checkpoint, image_path, prompt: str, max_new_tokens: int = 32) -> str:
    model, tokenizer, template, config = load_trained(checkpoint)
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"--image {str(image_path)!r} does not exist")
    with Image.open(image_path) as img:
        image = trained_transform(model, config)(img.convert("RGB")).unsqueeze(0)
    return answer_batch(model, tokenizer, template, image, [prompt], max_new_tokens)[0]


def main(argv=None, args=None) -> str:
    args = args or parse_args(make_arg_parser(), argv)
    torch.set_num_threads(1)
    answer = generate(args.checkpoint, args.image, args.prompt, args.max_new_tokens)
    print(answer)
    return answer


if __name__ == "__main__":
    run_main(main, args=ARGS)
