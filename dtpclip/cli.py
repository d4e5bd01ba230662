"""Shared command-line plumbing: argparse with a YAML/JSON `--config` whose keys are the flags."""
import argparse
from pathlib import Path
from typing import Optional, Sequence

import yaml


def make_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file of flag values (keys as the flags, - or _); the command line wins")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from `--config FILE` first; unknown keys are an error naming the file."""
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"config file {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
        if not isinstance(values, dict):
            parser.error(f"config file {str(path)!r} must hold a mapping of flag names to values")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        dests = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(values) - dests)
        if unknown:
            parser.error(f"config file {str(path)!r} has unknown key(s) {unknown}; expected some of {sorted(dests)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)
