"""open_clip_train trains what dtpclip's loop trains: `python -m dtpclip.open_clip_train` adds the encoder's aux
loss to its objective and its log."""
import logging
import re

import open_clip
import pytest
import torch

from dtpclip.encoders.vit import collecting_aux_losses
from dtpclip.open_clip_loss import WithAuxLoss
from dtpclip.open_clip_train import main


@pytest.fixture
def restore_logging():
    """open_clip_train's main configures the root logger; the tests after it keep theirs."""
    handlers, level = list(logging.root.handlers), logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_the_aux_loss_joins_the_loss_dict_with_its_gradient():
    torch.manual_seed(0)
    model = open_clip.create_model("DTP-ViT-Ti-8-64-4x", output_dict=True).train()  # as open_clip_train
    tokenizer = open_clip.get_tokenizer("DTP-ViT-Ti-8-64-4x")
    images, texts = torch.randn(4, 3, 64, 64), tokenizer(["a red circle", "a blue star", "a cat", "a dog"])
    loss = WithAuxLoss(open_clip.ClipLoss(), [], weight=0.5, log_every=1, log=False)
    torch.manual_seed(1)
    expected = model.visual.trunk.encode(images).aux_loss
    with collecting_aux_losses() as handed:
        loss.handed = handed
        torch.manual_seed(1)
        losses = loss(**model(images, texts), output_dict=True)
    assert set(losses) == {"contrastive_loss", "aux_loss"} and not handed
    assert torch.allclose(losses["aux_loss"], 0.5 * expected)
    losses["aux_loss"].backward()
    assert model.visual.trunk.boundary_predictor.mlp[0].weight.grad.abs().sum() > 0


def test_open_clip_train_main_trains_and_logs_the_boundary_loss(small_demo, tmp_path, restore_logging):
    main(["--train-data", small_demo.train_shards, "--train-num-samples", "192", "--dataset-type", "webdataset",
          "--model", "DTP-ViT-Ti-16-64-4x", "--batch-size", "32", "--epochs", "1", "--workers", "0",
          "--precision", "fp32", "--warmup", "2", "--log-every-n-steps", "1", "--logs", str(tmp_path),
          "--name", "dtp", "--aux-loss-weight", "2.0"])
    log = (tmp_path / "dtp" / "out.log").read_text()
    steps = re.findall(r"Contrastive_loss: (\S+) \(\S+\) Aux_loss: (\S+) \(\S+\) Loss: (\S+)", log)
    assert len(steps) >= 5, log
    for contrastive, aux, total in steps:  # the total it backpropagates holds the boundary loss
        assert float(aux) > 0 and abs(float(contrastive) + float(aux) - float(total)) < 1e-3 * float(total)
    ratios = [float(r) for r in re.findall(r"encoder stats: boundary_ratio: (\S+)", log)]
    assert len(ratios) >= 5 and all(0.1 < r < 0.4 for r in ratios)
    assert (tmp_path / "dtp" / "checkpoints" / "epoch_1.pt").exists()
