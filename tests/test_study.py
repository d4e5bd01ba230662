"""python -m dtpclip.study: runs per seed, run: references, skipping finished runs, the table, bad studies."""
import json
import statistics

import pytest
import yaml

from dtpclip import study


def write_study(path, micro_vit, micro_dtp, demo):
    common = dict(train_data=demo.train_shards, eval_data="", batch_size=16, workers=0, epochs=1, warmup_steps=2,
                  max_steps=3, save_every=3)
    entries = [{"name": "vit", "model": micro_vit, **common},
               {"name": "dtp from vit", "model": micro_dtp, "pretrained": "run:vit", **common},
               {"name": "vit tome", "of": "vit", "transform": "tome:r=2"}]
    path.write_text(yaml.safe_dump(entries))
    return path


def test_study_trains_each_seed_scores_and_skips_finished_runs(micro_vit_clip_name, micro_clip_name, small_demo,
                                                               tmp_path, monkeypatch):
    spec = write_study(tmp_path / "s.yaml", micro_vit_clip_name, micro_clip_name, small_demo)
    argv = ["--study", str(spec), "--seeds", "0", "1", "--out", str(tmp_path / "out"), "--eval-data",
            str(small_demo.eval_dir), "--batch-size", "2", "--repeats", "1", "--device", "cpu"]
    result = study.main(argv)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["vit", "dtp from vit", "vit tome"] and all(r["seeds"] == 2 for r in rows.values())
    vit = [100 * p["top1"] for p in result["runs"] if p["label"] == "vit"]
    assert rows["vit"]["top1_mean"] == pytest.approx(statistics.mean(vit))
    assert rows["vit"]["top1_std"] == pytest.approx(statistics.stdev(vit))
    assert rows["vit"]["top1_per_seed"] == vit and len(rows["vit"]["left_chance_at"]) == 2
    assert rows["vit tome"]["left_chance_at"] is None  # not trained
    assert rows["vit tome"]["gmacs"] < rows["vit"]["gmacs"] and rows["vit tome"]["train_step_ms"] is None
    assert rows["vit"]["tokens_out"] == 65 and rows["vit tome"]["tokens_out"] < 65  # every entry: the token mask
    assert rows["dtp from vit"]["train_step_ms"] > 0
    done = json.loads((tmp_path / "out" / "dtp_from_vit" / "seed1" / "study_done.json").read_text())
    assert done["settings"]["pretrained"] == "run:vit"  # the same seed's, recorded as written
    table = (tmp_path / "out" / "s.md").read_text()
    assert "| vit tome |" in table and (tmp_path / "out" / "s.png").stat().st_size > 0

    def no_training(cfg):
        raise AssertionError(f"{cfg.run_dir} was finished and trained again")

    monkeypatch.setattr("dtpclip.training.train", no_training)
    again = study.main(argv + ["--only", "vit tome"])  # builds on vit, whose runs are done
    assert [r["name"] for r in again["rows"]] == ["vit", "vit tome"]
    assert (tmp_path / "out" / "s.md").read_text() == table  # a partial run writes s-only-vit_tome.* instead
    assert "| vit tome |" in (tmp_path / "out" / "s-only-vit_tome.md").read_text()
    (tmp_path / "out" / "dtp_from_vit" / "seed1" / "study_done.json").unlink()  # as if seed 1 were cut short
    scored = {r["name"]: r for r in study.main(argv + ["--seeds", "0", "1", "2", "--score-only"])["rows"]}
    assert scored["vit"]["seeds"] == 2 and scored["dtp from vit"]["seeds"] == 1  # finished runs only, none trained
    assert scored["dtp from vit"]["top1_per_seed"] == rows["dtp from vit"]["top1_per_seed"][:1]
    other = tmp_path / "other.yaml"  # another study with the same entry shares its runs
    other.write_text(yaml.safe_dump(yaml.safe_load(spec.read_text())[:1]))
    assert [r["name"] for r in study.main([*argv[2:], "--study", str(other)])["rows"]] == ["vit"]
    assert "| vit |" in (tmp_path / "out" / "other.md").read_text()

    changed = yaml.safe_load(spec.read_text())
    changed[0]["lr"] = 5e-4
    spec.write_text(yaml.safe_dump(changed))
    with pytest.raises(ValueError, match=r"vit/seed0 holds a finished run .* other settings \(lr\)"):
        study.main(argv + ["--only", "vit"])  # another study of the same name reuses no run it did not train


def test_left_chance_at_is_the_first_step_below_ln_batch(tmp_path):
    losses = {10: 4.2, 20: 4.159, 30: 4.0, 40: 3.5}
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": step, "contrastive_loss": loss}) + "\n" for step, loss in losses.items())
        + json.dumps({"kind": "eval", "step": 40, "top1": 0.5}) + "\n")
    assert study.left_chance_at(tmp_path, 64) == 30  # ln 64 = 4.159: the collapsed start
    assert study.left_chance_at(tmp_path, 16) is None  # never below ln 16 - 0.1


@pytest.mark.parametrize("entries, message", [
    ([{"name": "a"}], "needs `model`"),
    ([{"name": "a", "model": "PlainViT-Ti-16-64", "epoch": 2}], r"unknown keys \['epoch'\]"),
    ([{"name": "a", "model": "PlainViT-Ti-16-64", "teacher": "run:b"}], "names no entry before it"),
    ([{"name": "t", "of": "a", "transform": "tome:r=1"}], "`of` an entry before it"),
    ([{"name": "a", "model": "PlainViT-Ti-16-64"}, {"name": "a", "model": "PlainViT-Ti-16-64"}], "a name of its own"),
])
def test_bad_studies_are_clear_errors(tmp_path, entries, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(entries))
    with pytest.raises(ValueError, match=message):
        study.load_study(str(path))


def test_built_in_studies_are_valid_and_unknown_names_are_errors():
    assert [e["name"] for e in study.needed(study.load_study("dtp_recipes"), ["DTP 4x from ViT 3 epochs + KD"])] == \
        ["ViT 3 epochs", "DTP 4x from ViT 3 epochs + KD"]
    with pytest.raises(FileNotFoundError, match="neither a built-in study"):
        study.load_study("nonexistent.yaml")
    with pytest.raises(ValueError, match="no such entries"):
        study.needed(study.load_study("families"), ["ViT", "Swin"])
    assert [e["name"] for e in study.needed(study.load_study("families"), ["ViT + ToMe r=1"])] == \
        ["ViT", "ViT + ToMe r=1"]
