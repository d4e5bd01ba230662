"""The checkpoint writer: room is made before a save, a failed save (a full disk) leaves the previous
checkpoint intact and no staging directory, and a resume skips a newest checkpoint it cannot read."""
import errno
import logging

import pytest
import torch

from dtpclip import checkpointing


def save(run_dir, step: int) -> None:
    checkpointing.make_room(run_dir, step)
    checkpointing.write_rank_part(run_dir, step, 0)
    checkpointing.write_main_part(run_dir, step, {"w": torch.full((2,), float(step))}, {"step": step}, {"model": "x"})
    checkpointing.publish(run_dir, step)


def test_a_run_keeps_two_checkpoints_and_makes_room_before_staging(tmp_path):
    for step in (3, 6, 9):
        save(tmp_path, step)
    assert [p.name for p in checkpointing.published(tmp_path)] == ["step_00000006", "step_00000009"]
    checkpointing.make_room(tmp_path, 9)  # step 9 saved again in place: step 6 stays intact meanwhile
    assert [p.name for p in checkpointing.published(tmp_path)] == ["step_00000006", "step_00000009"]
    checkpointing.make_room(tmp_path, 12)
    assert [p.name for p in checkpointing.published(tmp_path)] == ["step_00000009"]  # room for the next one


def test_disk_full_mid_save_keeps_the_previous_checkpoint_and_resumes(tmp_path, monkeypatch):
    save(tmp_path, 3)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpointing, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint step 6 .*No space left on device\. The previous "
                                      r"checkpoint '.*step_00000003' is intact; free space .*--resume auto"):
        save(tmp_path, 6)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    path, state = checkpointing.load_resume("auto", tmp_path, 0)
    assert path.name == "step_00000003" and state["trainer"]["step"] == 3
    monkeypatch.undo()
    save(tmp_path, 6)  # with room again
    assert checkpointing.load_resume("auto", tmp_path, 0)[1]["trainer"]["step"] == 6


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    save(tmp_path, 3)
    save(tmp_path, 6)
    (tmp_path / "checkpoints" / "step_00000006" / "trainer.pt").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        path, state = checkpointing.load_resume("auto", tmp_path, 0)
    assert path.name == "step_00000003" and torch.equal(state["model"]["w"], torch.full((2,), 3.0))
    assert "step_00000006" in caplog.text and "trainer.pt" in caplog.text and "previous one" in caplog.text


def test_an_unreadable_checkpoint_given_by_path_names_the_file(tmp_path):
    save(tmp_path, 3)
    (tmp_path / "checkpoints" / "step_00000003" / "rng_0.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot resume from .*step_00000003.*could not read .*rng_0.pt"):
        checkpointing.load_resume(str(tmp_path / "checkpoints" / "step_00000003"), tmp_path, 0)


def test_metrics_past_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"kind": "train", "step": {s}}}\n' for s in (1, 2, 3, 4)))
    checkpointing.trim_metrics(path, 2)
    assert path.read_text() == '{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n'
