"""LLaVA's training options at scale, each on the tiny model: gradient checkpointing, the projector's own lr and
HF's no-decay groups, group_by_modality_length, image_aspect_ratio pad, fp16's DeepSpeed config."""
import torch
from PIL import Image
from test_llava_model import tiny_lm
from conftest import tiny

from llava_bridge.align import deepspeed_config, modality_batches, param_groups
from llava_bridge.align_config import CONFIG_DIR, AlignConfig
from llava_bridge.build import expand_to_square, image_transform
from llava_bridge.conversation import IMAGE_TOKEN_INDEX
from llava_bridge.model import LlavaModel, VisionTower


def projector_grads(checkpointing: bool, images):
    lm = tiny_lm()
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = LlavaModel(VisionTower(tiny()), lm, "mlp2x_gelu").train()
    lm.requires_grad_(False)  # stage 1
    input_ids = torch.tensor([[3, IMAGE_TOKEN_INDEX, 4, 5, 6]] * 3)
    logits, labels, _ = model(input_ids, torch.ones_like(input_ids), input_ids.clamp_min(0), images)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    return loss.detach(), [p.grad for p in model.projector.parameters()]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(images):
    loss, grads = projector_grads(False, images)
    loss_ckpt, grads_ckpt = projector_grads(True, images)
    assert torch.allclose(loss, loss_ckpt) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt))


def test_projector_lr_and_no_decay_groups():
    model = LlavaModel(VisionTower(tiny()), tiny_lm(), "mlp2x_gelu")
    cfg = AlignConfig(stage="finetune", weight_decay=0.1, mm_projector_lr=2e-4)
    groups = param_groups(model, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.projector[0].weight)] == next(g for g in groups if g.get("lr") == 2e-4 and g["weight_decay"])
    assert by_id[id(model.projector[0].bias)]["weight_decay"] == 0.0 and by_id[id(model.projector[0].bias)]["lr"] == 2e-4
    lm_norm = model.language_model.model.norm.weight
    assert by_id[id(lm_norm)]["weight_decay"] == 0.0 and "lr" not in by_id[id(lm_norm)]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_group_by_modality_length_keeps_each_global_batch_to_one_modality():
    lengths = [5, -3, 12, -7, 9, 2, -4, 30, 8, -1, 6, -2, 11, 3]  # 9 with an image, 5 text-only
    ranks = [modality_batches(lengths, micro=2, rank=r, world=2, seed=0, epoch=1) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 9 // 4 + 5 // 4  # full global batches of 4 only
    for step in zip(*ranks):
        members = [i for batch in step for i in batch]
        assert len(set(members)) == 4 and len({lengths[i] > 0 for i in members}) == 1
        ordered = sorted(members, key=lambda i: -abs(lengths[i]))
        assert [step[0], step[1]] == [ordered[0::2], ordered[1::2]]  # longest first, dealt in turn
    assert ranks[0] == modality_batches(lengths, 2, 0, 2, seed=0, epoch=1)
    assert ranks[0] != modality_batches(lengths, 2, 0, 2, seed=0, epoch=2)


def test_pad_keeps_the_whole_image_where_crop_cuts_its_sides():
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    square = expand_to_square(wide, (1, 2, 3))
    assert square.size == (30, 30) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 15)) == (255, 0, 0)
    tower = VisionTower(tiny())
    padded, cropped = image_transform(tower, "pad")(wide), image_transform(tower, "crop")(wide)
    assert padded.shape == cropped.shape == (3, 64, 64)
    assert torch.allclose(cropped[:, 0, 0], cropped[:, 32, 32])  # cropped: red everywhere
    assert not torch.allclose(padded[:, 0, 32], padded[:, 32, 32])  # padded: the mean above and below


def test_fp16_fills_deepspeeds_fp16_block():
    cfg = AlignConfig(precision="fp16", batch_size=4)
    config = deepspeed_config(CONFIG_DIR / "zero2.json", cfg, world=1, bf16=False, hidden=16)
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False
