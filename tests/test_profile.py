"""The profiler's figures: MACs against hand counts and known values, memory, the CLI."""
import json

import pytest
import torch

from conftest import TINY, tiny
from dtpclip.flops import count_macs
from dtpclip.measure import peak_memory_bytes
from dtpclip.profile import build_visual_tower, main


def vit_macs(tokens: int, dim: int, depth: int, patches: int, patch: int, layer_norms: int) -> dict:
    """Hand count: linear layers, attention (q k^T and attn v), patch conv, and fvcore's 5 per LayerNorm element."""
    attention = depth * (tokens * 4 * dim * dim + 2 * tokens * tokens * dim)
    mlp = depth * tokens * 8 * dim * dim
    return {"total": patches * 3 * patch * patch * dim + attention + mlp + layer_norms * 5 * tokens * dim,
            "attention": attention}


def test_macs_of_plain_vit_match_hand_count(images):
    model = tiny()
    counted = count_macs(model, images)
    d, n = TINY["embed_dim"], 64 + 1
    expected = vit_macs(tokens=n, dim=d, depth=TINY["depth"], patches=64, patch=8, layer_norms=2 * TINY["depth"] + 2)
    assert counted.total == expected["total"]
    assert counted.attention == expected["attention"]


def test_dtp_macs_count_actual_tokens(images):
    """All boundaries on: the plain ViT's MACs plus the predictor MLP and the L x L pooling matmul."""
    plain, dtp = tiny(), tiny("dtp_vit_tiny_patch8_64")
    with torch.no_grad():
        dtp.boundary_predictor.mlp[-1].bias.fill_(100.0)
    hidden = 4 * TINY["embed_dim"]
    extra = 64 * (TINY["embed_dim"] * hidden + hidden) + 64 * 64 * TINY["embed_dim"]
    assert count_macs(dtp, images).total == count_macs(plain, images).total + extra


def test_vit_b32_matches_known_figures():
    tower = build_visual_tower("plain_vit_base_patch32_224").eval()
    macs = count_macs(tower, torch.randn(1, 3, 224, 224))
    assert sum(p.numel() for p in tower.parameters()) == 87_849_216  # open_clip ViT-B-32 visual: 87.85M
    assert abs(macs.total / 4.41e9 - 1) < 0.01
    assert abs(macs.attention_free / 2.95e9 - 1) < 0.01


def test_profile_prints_the_vq_vit_seeds_figures():
    """The seed's validate.py --reparam on VQ-ViT-S/16 (FSQ [3, 3, 3, 3]): 12.36M parameters and 2.159 G (fvcore,
    no attention matmuls); ours 12.365M and 2.1601 G, 0.05% apart (the head's 0.0004 G is about the gap)."""
    result = main(["--model", "vqvit_small_patch16_224", "--layout", "timm", "--transform", "reparam",
                   "--embed-dim", "0", "--batch-size", "1", "--repeats", "1", "--flops-images", "1", "--json"])
    assert int(result["params_m"] * 100) == 1236 and abs(result["gmacs_without_attention_matmuls"] / 2.159 - 1) < 1e-3
    assert result["gmacs"] > result["gmacs_without_attention_matmuls"] > result["gmacs_attention_free"]


def test_cpu_peak_memory_sees_a_known_allocation():
    def step():
        return torch.ones(10 * 2**20).sum()  # 40 MiB of float32, freed before returning

    peak = peak_memory_bytes(step, torch.device("cpu"))
    assert 38 * 2**20 <= peak < 48 * 2**20


def test_profile_cli_reports_dtp_figures(capsys, tmp_path):
    config = tmp_path / "profile.yaml"
    config.write_text("model: dtp_vit_tiny_patch8_64_4x\nbatch-size: 2\nrepeats: 1\nflops_images: 1\n")
    result = main(["--config", str(config), "--train", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "dtp_vit_tiny_patch8_64_4x" and printed["batch_size"] == 2
    assert 0 < result["gmacs"] and "boundary_ratio" in result["stats"] and "boundary_ratio" in result["train_stats"]
    assert result["train_step_ms"] > 0 and result["params_m"] > result["encoder_params_m"]


def test_config_file_with_unknown_key_names_the_file(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"modle": "x"}))
    with pytest.raises(SystemExit):
        main(["--config", str(config)])
    err = capsys.readouterr().err
    assert "bad.json" in err and "unknown key(s) ['modle']" in err


def test_profile_tome_sweep_lowers_macs(capsys):
    results = main(["--model", "plain_vit_tiny_patch8_64", "--sweep", "tome:r=0", "tome:r=8", "--batch-size", "2",
                    "--repeats", "1", "--flops-images", "1", "--embed-dim", "0", "--json"])
    assert [r["model"] for r in results] == ["plain_vit_tiny_patch8_64 tome:r=0", "plain_vit_tiny_patch8_64 tome:r=8"]
    assert results[1]["gmacs"] < 0.8 * results[0]["gmacs"]
    assert results[1]["stats"]["tokens_per_image"] < results[0]["stats"]["tokens_per_image"]
