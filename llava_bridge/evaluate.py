"""python -m llava_bridge.evaluate: does a trained LLaVA-style model answer right?

    python -m llava_bridge.evaluate                                   # the newest demo run on the demo eval set
    python -m llava_bridge.evaluate --checkpoint RUN --questions questions.jsonl --image-folder images/ \\
        --answers answers.jsonl                                       # LLaVA-Bench style: answers to score

On a labelled eval set (the demo's by default; any dtpclip eval set: CLIP_benchmark wds or
ImageFolder with classnames.txt), each image is asked `--question` and the answer is right when it
names the image's class and no other class (whole words): accuracy, per class, and a few answers.
With `--questions` (LLaVA's model_vqa input: one json per line with question_id, image, text), each
question is answered and written to `--answers` as LLaVA's model_vqa writes them (question_id,
prompt, text, model_id), for a judge or a script to score.
"""
from dtpclip.cli import early_args, make_parser, parse_args, run_main

DEMO_QUESTION = "Write a short caption for the picture."  # one of the demo data's own prompts


def make_arg_parser():
    parser = make_parser(__doc__.splitlines()[0], "python -m llava_bridge.evaluate")
    parser.add_argument("--checkpoint", default=None,
                        help="a llava_align run directory or its final/ (default: the newest one under the runs root)")
    parser.add_argument("--data", default=None, help="labelled eval set (default: the demo eval set)")
    parser.add_argument("--question", default=DEMO_QUESTION, help="what each eval image is asked")
    parser.add_argument("--questions", default=None, help="LLaVA-Bench style questions jsonl (instead of --data)")
    parser.add_argument("--image-folder", default=None, help="with --questions: the images' folder")
    parser.add_argument("--answers", default=None, help="with --questions: the answers jsonl to write (a new file)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images or questions only")
    parser.add_argument("--batch-size", type=int, default=32, help="images answered per generate() call")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap")
    parser.add_argument("--examples", type=int, default=6, help="answers to show")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    return parser


# `python -m`: the arguments are parsed here, before the heavy imports below (fast --help)
ARGS = early_args(make_arg_parser, __name__)

import itertools  # noqa: E402  (after the early parse, as every import below)
import json
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch
from PIL import Image

from dtpclip.checkpoint import write_json
from dtpclip.checkpointing import runs_root
from dtpclip.evalsets import load_eval_set
from dtpclip.evaluate import demo_eval_dir
from llava_bridge.build import CONFIG_FILE, load_trained, trained_dir, trained_transform
from llava_bridge.generate import answer_batch


def newest_trained() -> Path:
    """The newest llava_align run's final/ under the runs root."""
    found = sorted(runs_root().glob(f"*/final/{CONFIG_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no trained LLaVA run under {runs_root()}: train one with `deepspeed "
                                "launch/llava_align.py` (or pass --checkpoint)")
    return found[-1].parent


def names_class(answer: str, label: int, classnames: Sequence[str]) -> bool:
    """Whether `answer` names class `label` and no other class, as whole words (case-insensitive)."""
    named = {i for i, name in enumerate(classnames)
             if re.search(rf"\b{re.escape(name.lower())}\b", answer.lower())}
    return named == {label}


def batched(items: Iterable, size: int) -> Iterable[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def evaluate_labelled(model, tokenizer, template, transform, data, question: str, batch_size: int,
                      max_new_tokens: int, limit: Optional[int] = None, examples: int = 6) -> dict:
    """Accuracy of the answers about a labelled eval set (see the module doc)."""
    evalset = load_eval_set(data, transform)
    samples = itertools.islice(evalset.dataset, limit)
    labels: List[int] = []
    answers: List[str] = []
    for batch in batched(samples, batch_size):
        images = torch.stack([image for image, _ in batch])
        answers += answer_batch(model, tokenizer, template, images, [question] * len(batch), max_new_tokens)
        labels += [label for _, label in batch]
    if not labels:
        raise ValueError(f"eval set {data} gave no images")
    right = [names_class(a, y, evalset.classnames) for a, y in zip(answers, labels)]
    per_class = {name: [r for r, y in zip(right, labels) if y == i] for i, name in enumerate(evalset.classnames)}
    return {"accuracy": sum(right) / len(right), "n": len(right), "question": question,
            "per_class": {name: sum(r) / len(r) for name, r in per_class.items() if r},
            "examples": [{"class": evalset.classnames[y], "answer": a, "right": r}
                         for a, y, r in list(zip(answers, labels, right))[:examples]]}


def answer_questions(model, tokenizer, template, transform, questions_file, image_folder, answers_file,
                     model_id: str, batch_size: int, max_new_tokens: int, limit: Optional[int] = None) -> dict:
    """LLaVA-Bench style: answer each question of a jsonl into a new answers jsonl (see the module doc)."""
    answers_path = Path(answers_file)
    if answers_path.exists():
        raise FileExistsError(f"--answers {str(answers_path)!r} already exists: choose a new file")
    questions = [json.loads(line) for line in Path(questions_file).read_text().splitlines() if line.strip()]
    questions = questions[:limit]
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    partial = answers_path.with_name(answers_path.name + ".partial")
    with partial.open("w") as out:
        for batch in batched(questions, batch_size):
            images = []
            for question in batch:
                path = Path(image_folder) / question["image"]
                if not path.is_file():
                    raise FileNotFoundError(f"{questions_file}: question {question.get('question_id')!r} names "
                                            f"image {str(path)!r}, which does not exist")
                with Image.open(path) as image:
                    images.append(transform(image.convert("RGB")))
            texts = answer_batch(model, tokenizer, template, torch.stack(images), [q["text"] for q in batch],
                                 max_new_tokens)
            for question, text in zip(batch, texts):
                out.write(json.dumps({"question_id": question["question_id"], "prompt": question["text"],
                                      "text": text, "model_id": model_id, "metadata": {}}) + "\n")
    partial.rename(answers_path)
    return {"answers": str(answers_path), "n": len(questions)}


def main(argv=None, args=None) -> dict:
    args = args or parse_args(make_arg_parser(), argv)
    if args.questions and not (args.image_folder and args.answers):
        raise ValueError("--questions needs --image-folder (where its images are) and --answers (a new jsonl)")
    checkpoint = trained_dir(args.checkpoint) if args.checkpoint else newest_trained()
    model, tokenizer, template, config = load_trained(checkpoint)
    transform = trained_transform(model, config)
    if args.questions:
        result = answer_questions(model, tokenizer, template, transform, args.questions, args.image_folder,
                                  args.answers, str(checkpoint), args.batch_size, args.max_new_tokens, args.limit)
    else:
        result = evaluate_labelled(model, tokenizer, template, transform, args.data or demo_eval_dir(),
                                   args.question, args.batch_size, args.max_new_tokens, args.limit, args.examples)
        print(f"{checkpoint}: answer accuracy {result['accuracy']:.3f} on {result['n']} images ({template.name}: "
              f"{args.question!r})")
        for example in result["examples"]:
            print(f"  [{'right' if example['right'] else 'wrong'}] {example['class']}: {example['answer']!r}")
    result = {"checkpoint": str(checkpoint), **result}
    if args.output:
        write_json(args.output, result)
    return result


if __name__ == "__main__":
    run_main(main, args=ARGS)
