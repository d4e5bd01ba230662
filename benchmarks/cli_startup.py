"""How long each entry point takes to answer --help, against `import dtpclip`, side by side in one run.

Each command runs in a fresh interpreter (`repeats` times, median); the ratio is import time / --help
time, so above 1 means --help answers before the heavy imports.

    python benchmarks/cli_startup.py [--repeats 3]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import dtpclip": [sys.executable, "-c", "import dtpclip"],
    **{f"python -m {m} --help": [sys.executable, "-m", m, "--help"] for m in (
        "dtpclip.zeroshot", "dtpclip.classify", "dtpclip.profile", "dtpclip.quantize", "dtpclip.visualize",
        "dtpclip.models", "dtpclip.demo_data", "llava_bridge.generate", "llava_bridge.export")},
    **{f"{name} --help": [sys.executable, str(ROOT / "launch" / name), "--help"]
       for name in ("clip_pretrain.py", "llava_align.py")},
}


def seconds(command, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command (median)")
    args = parser.parse_args(argv)
    times = {label: seconds(command, args.repeats) for label, command in COMMANDS.items()}
    base = times["import dtpclip"]
    for label, value in times.items():
        print(f"{label:45s} {value:6.2f} s   import / this: {base / value:5.1f}x")
    return times


if __name__ == "__main__":
    main()
