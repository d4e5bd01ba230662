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

import torch
from PIL import Image

from llava_bridge.build import image_transform, load_trained
from llava_bridge.conversation import IMAGE_TOKEN, generation_prompt, tokenize_with_image


def generate(checkpoint, image_path, prompt: str, max_new_tokens: int = 32) -> str:
    model, tokenizer, template, _ = load_trained(checkpoint)
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"--image {str(image_path)!r} does not exist")
    with Image.open(image_path) as img:
        image = image_transform(model.vision_tower)(img.convert("RGB")).unsqueeze(0)
    text = generation_prompt(f"{IMAGE_TOKEN}\n{prompt}", template)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    input_ids = torch.tensor([bos + tokenize_with_image(text, tokenizer)])
    new = model.generate(input_ids, image, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()


def main(argv=None, args=None) -> str:
    args = args or parse_args(make_arg_parser(), argv)
    torch.set_num_threads(1)
    answer = generate(args.checkpoint, args.image, args.prompt, args.max_new_tokens)
    print(answer)
    return answer


if __name__ == "__main__":
    run_main(main, args=ARGS)
