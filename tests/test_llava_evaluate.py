"""python -m llava_bridge.evaluate: the answer score, and batched answers equal to `llava_bridge.generate`'s."""
import json

import pytest

from llava_bridge.align import train
from llava_bridge.align_config import AlignConfig
from llava_bridge.evaluate import main, names_class
from llava_bridge.generate import generate

CLASSES = ["circle", "arrow", "star", "ring"]


@pytest.mark.parametrize("answer, label, right", [
    ("a picture of the arrow.", 1, True),
    ("The Star shape", 2, True),
    ("a circle and a star", 0, False),  # names another class too
    ("an arrowhead", 1, False),  # whole words only
    ("a drawing of the ring.", 0, False),
])
def test_an_answer_is_right_when_it_names_its_class_and_no_other(answer, label, right):
    assert names_class(answer, label, CLASSES) is right


@pytest.fixture(scope="module")
def trained(small_demo, demo_lm, tmp_path_factory):
    run = tmp_path_factory.mktemp("llava") / "run"
    return train(AlignConfig(data_path=str(small_demo.llava_json), image_folder=str(small_demo.llava_images),
                             lm=str(demo_lm), encoder="dtp_vit_tiny_patch16_64_4x", encoder_checkpoint="none",
                             batch_size=8, workers=0, max_steps=2, run_dir=str(run)))


def test_labelled_eval_scores_the_answers_generate_gives(small_demo, trained, tmp_path):
    result = main(["--checkpoint", str(trained), "--data", str(small_demo.eval_dir), "--limit", "6",
                   "--batch-size", "4", "--examples", "6", "--max-new-tokens", "8", "--output", str(tmp_path / "r.json")])
    assert result["n"] == 6 and json.loads((tmp_path / "r.json").read_text())["accuracy"] == result["accuracy"]
    assert result["accuracy"] == sum(e["right"] for e in result["examples"]) / 6


def test_questions_are_answered_as_generate_answers_each_alone(small_demo, trained, tmp_path):
    records = json.loads(small_demo.llava_json.read_text())[:3]
    questions = [{"question_id": i, "image": r["image"], "text": q}
                 for i, (r, q) in enumerate(zip(records, ["What is it?", "Describe the image.", "Which shape?"]))]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    args = ["--checkpoint", str(trained), "--questions", str(tmp_path / "q.jsonl"), "--image-folder",
            str(small_demo.llava_images), "--answers", str(tmp_path / "a.jsonl"), "--max-new-tokens", "8"]
    main(args)
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2]
    for question, answer in zip(questions, answers):
        alone = generate(trained, small_demo.llava_images / question["image"], question["text"], max_new_tokens=8)
        assert answer["text"] == alone and answer["prompt"] == question["text"]
    with pytest.raises(FileExistsError, match="already exists"):
        main(args)
