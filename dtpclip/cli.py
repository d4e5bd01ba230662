"""Shared command-line plumbing: argparse with a YAML/JSON `--config` whose keys are the flags."""
import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from dtpclip.registry import list_transforms, parse_kwargs


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
        keys = {}  # a flag's name (--model-kwargs -> model_kwargs) or its dest, -> its dest
        for action in parser._actions:
            if action.dest in ("help", "config"):
                continue
            keys[action.dest] = action.dest
            keys.update({o.lstrip("-").replace("-", "_"): action.dest for o in action.option_strings})
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(keys))
        if unknown:
            parser.error(f"config file {str(path)!r} has unknown key(s) {unknown}; expected some of {sorted(keys)}")
        parser.set_defaults(**{keys[k]: v for k, v in values.items()})
    return parser.parse_args(argv)


def _converter(annotation):
    """argparse type for a dataclass field: Optional[X] also takes 'none'."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if not args:
        return annotation
    return lambda text: None if text.lower() in ("none", "null") else args[0](text)


class ParseKwargs(argparse.Action):
    """key=value ... into a dict, values read as timm's --model-kwargs reads them (Python literals)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}),
                                           **parse_kwargs(values, option_string)})
        except ValueError as e:
            parser.error(str(e))


def add_model_kwargs(parser: argparse.ArgumentParser, dest: str = "model_kwargs") -> None:
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, dest=dest, metavar="KEY=VALUE",
                        help="encoder constructor kwargs, e.g. compression=0.2 pre_layers=3 (saved in the "
                             "checkpoint's config, so evaluators rebuild the same model)")


def add_transform(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transform", action="append", default=[], metavar="SPEC", dest="transforms",
                        help="training-free transform of the encoder, repeatable and applied in order: "
                             f"{transform_help()}")


def transform_help() -> str:
    return "; ".join(f"{t.name}:{','.join(f'{k}={v}' for k, v in t.params.items())}" for t in list_transforms())


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of `config_cls` (--field-name), with its default and metadata help;
    fields marked `kwargs` take key=value pairs, fields marked `transforms` transform specs."""
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        if f.metadata.get("kwargs"):
            parser.add_argument(flag, nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE", help=help_text)
        elif f.metadata.get("transforms"):
            parser.add_argument("--transform", action="append", default=[], metavar="SPEC", dest=f.name,
                                help=f"{help_text} ({transform_help()})")
        elif f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=_converter(f.type), default=f.default, choices=choices, help=help_text)


def dataclass_from_args(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def add_json_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, help="also write the raw figures to this file")


def measure_and_report(args: argparse.Namespace, measure: Callable, report: Callable):
    """A benchmark's body: measure, print the side-by-side report, and write `--json` if given."""
    results = measure(args)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def run_main(main: Callable) -> None:
    """A `python -m` entry: bad input (a missing file, a wrong value) exits with its message, no traceback."""
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
