"""The LR range test: it restores the model, suggests where the loss falls fastest, and runs both tasks."""
import json
import math

import torch

from dtpclip import lr_find

FASTEST = 1e-3  # the synthetic curve's steepest point


def test_suggestion_is_where_a_synthetic_curve_falls_fastest_and_the_model_is_restored():
    """A tanh in log lr falls fastest at its centre, half-way down its one long valley: both rules find it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())

    def loss(outputs, _):  # falls fastest at lr = 1e-3 against log lr, whatever the model does
        lr = optimizer.param_groups[0]["lr"]
        return 2.0 - math.tanh((math.log10(lr) - math.log10(FASTEST)) / 0.5) + 0.0 * outputs.sum()

    batches = [(torch.randn(8, 4),)] * 3
    step = 6 / 99  # decades per step of the ramp
    for rule, tolerance in (("steepest", step), ("valley", 2 * step)):
        result = lr_find.range_test(model, optimizer, loss, batches, lambda batch: (batch, None), steps=100,
                                    start_lr=1e-6, end_lr=1.0, smooth=0.0, rule=rule)
        assert abs(math.log10(result.suggestion) - math.log10(FASTEST)) <= tolerance, rule
    assert len(result.lrs) == 100 and result.lrs[0] == 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the weights moved, then back
    assert not optimizer.state and optimizer.param_groups[0]["lr"] == 1e-6


def test_valley_and_minimum_rules_on_a_noisy_start():
    """A noisy start, a long fall to the minimum at index 60, then divergence: steepest picks the noise."""
    lrs = [10 ** (-6 + 6 * i / 79) for i in range(80)]
    losses = [4.4 + (0.05 if i % 2 else 0.0) for i in range(10)] + [4.4 - 0.01 * i for i in range(50)] \
        + [3.9 + 0.2 * i for i in range(20)]
    # the fall: 52 losses ending at 60, so taken from 8; half-way through its middle third: 8 + 17 + 8
    assert lr_find.valley_index(losses) == 33
    assert lr_find.suggest(lrs, losses, "minimum") == lrs[60] / 10
    assert lr_find.suggest(lrs, losses, "steepest") == lrs[1]  # the noise's first drop is the steepest


def test_classify_and_clip_tasks_write_the_plot_and_curve(tmp_path, small_demo):
    result = lr_find.main(["--task", "classify", "--train-data", str(small_demo.eval_dir), "--train-split", "test",
                           "--steps", "20",
                           "--batch-size", "16", "--workers", "0", "--end-lr", "1e-1",
                           "--out", str(tmp_path / "classify.png")])
    curve = json.loads((tmp_path / "classify.json").read_text())
    assert (tmp_path / "classify.png").stat().st_size > 0 and curve["suggested_lr"] == result.suggestion
    assert 1e-6 < result.suggestion < 1e-1 and len(curve["lr"]) == len(curve["smoothed_loss"]) > 15
    result = lr_find.main(["--train-data", small_demo.train_shards, "--steps", "20", "--batch-size", "16",
                           "--workers", "0", "--out", str(tmp_path / "clip.png")])
    assert (tmp_path / "clip.png").exists() and 1e-6 < result.suggestion < 1.0
