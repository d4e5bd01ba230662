"""data/laion_to_shards.py runs img2dataset for real (against a local HTTP server) and
dtpclip.data reads the shards it makes."""

import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dtpclip.data import SampleCounts, count_samples, expand_shards, iter_samples, make_train_loader

RECIPE = Path(__file__).parents[1] / "data" / "laion_to_shards.py"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_laion_parquet_to_shards_round_trip(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (60 + 10 * i, 90, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(www / f"{i}.jpg", quality=90)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = pd.DataFrame({
        "URL": [f"{base}/{i}.jpg" for i in range(6)] + [f"{base}/gone.jpg"],
        "TEXT": [f"a photo number {i}" for i in range(7)],
        "NSFW": ["UNLIKELY"] * 6 + ["UNSURE"],
        "similarity": [0.3 + 0.01 * i for i in range(7)],
        "LICENSE": ["?"] * 7,
    })
    rows.to_parquet(tmp_path / "part-00000.parquet")
    out = tmp_path / "shards"
    try:
        run = subprocess.run(
            [sys.executable, str(RECIPE), "--url-list", str(tmp_path / "part-00000.parquet"), "--output-folder",
             str(out), "--processes-count", "1", "--thread-count", "4", "--image-size", "64",
             "--number-sample-per-shard", "4"],
            capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 of 7 samples written to 2 shard(s)" in run.stdout

    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert [s["successes"] for s in stats] == [4, 2]
    assert stats[1]["failed_to_download"] == 1 and stats[1]["status_dict"]["HTTP Error 404: File not found"] == 1

    counts = SampleCounts()
    samples = sorted(iter_samples(out, counts), key=lambda s: s.caption)
    assert counts.snapshot().seen == 6 and not any(counts.snapshot().skipped.values())
    assert [s.caption for s in samples] == [f"a photo number {i}" for i in range(6)]
    for i, s in enumerate(samples):
        assert s.image.size == (64, 64)  # img2dataset's border resize to --image-size
        assert s.meta["url"] == f"{base}/{i}.jpg" and s.meta["NSFW"] == "UNLIKELY"
        assert s.meta["similarity"] == rows["similarity"][i] and s.meta["LICENSE"] == "?"

    assert count_samples(expand_shards(out)) == 6  # from img2dataset's stats files
    def ids(captions):
        return torch.tensor([int(c[-1]) for c in captions])

    loader = make_train_loader(out, lambda image: torch.zeros(1), ids, 2, num_workers=0, shuffle_buffer=0)
    assert len(loader) == 3
    assert sorted(i for _, batch in loader for i in batch.tolist()) == list(range(6))
