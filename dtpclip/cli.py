"""Shared command-line plumbing: argparse with a YAML/JSON `--config` whose keys are the flags.

No torch here: every entry point parses its arguments (and answers --help) before the heavy imports
(`early_args`), so --help and argument errors come at once.
"""
import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from dtpclip.specs import parse_kwargs


def status(message: str) -> None:
    """A line on stderr before a phase that takes a while, so a long silence has a reason."""
    print(f"[dtpclip] {message}", file=sys.stderr, flush=True)


def make_parser(description: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An entry point's parser; `prog` is how a user runs it ('python -m dtpclip.zeroshot')."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file of flag values (keys as the flags, - or _); the command line wins")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from `--config FILE` first: its values go through each flag's own
    type and choices, and any problem is an error naming the file and the key. The command line wins."""
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_config_values(parser, Path(known.config)))
    return parser.parse_args(argv)


def _config_values(parser: argparse.ArgumentParser, path: Path) -> dict:
    """{dest: converted value} of a YAML / JSON config file; parser.error names the file on any problem."""
    if not path.is_file():
        parser.error(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
    except yaml.YAMLError as e:
        parser.error(f"config file {str(path)!r} is not valid YAML / JSON: {e}")
    if not isinstance(values, dict):
        parser.error(f"config file {str(path)!r} must hold a mapping of flag names to values")
    actions = {}  # a flag's name (--model-kwargs -> model_kwargs) or its dest -> its action
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            actions[action.dest] = action
            actions.update({o.lstrip("-").replace("-", "_"): action for o in action.option_strings})
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        parser.error(f"config file {str(path)!r} has unknown key(s) {unknown}; expected some of {sorted(actions)}")
    converted = {}
    for key, value in values.items():
        try:
            converted[actions[key].dest] = _convert(actions[key], value)
        except (TypeError, ValueError) as e:
            parser.error(f"config file {str(path)!r}, key {key!r}: {e}")
    return converted


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _convert(action: argparse.Action, value):
    """A config value as the command line would give it to `action`."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # flags
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, ParseKwargs):
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        return parse_kwargs(value if isinstance(value, list) else [value], action.option_strings[0])
    if value is None:
        return None
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return [_convert_one(action, v) for v in (value if isinstance(value, list) else [value])]
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value):
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected a single value, got {value!r}")
    if action.type is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    text = str(int(value)) if action.type is int and isinstance(value, float) else str(value)
    converted = action.type(text) if action.type is not None else text
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {list(action.choices)}, got {value!r}")
    return converted


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
    # text, not the registry's list: --help answers before the encoders are imported
    return ("NAME:key=value,..., e.g. tome:r=8, lgtm:r=8,dense=2,local=2, ptq:w=4,a=4,qwt=true "
            "(python -m dtpclip.models --transforms lists them all)")


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


def check_config(config) -> None:
    """A run config's values against its fields: numbers of the field's type, at least the metadata's
    `min`; errors name the flag. Called from the configs' __post_init__, so the Python API checks too."""
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        kinds = [a for a in typing.get_args(f.type) if a is not type(None)] or [f.type]
        if value is None or kinds[0] not in (int, float):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kinds[0] is int and isinstance(value, float)):
            raise ValueError(f"{flag} must be {'an integer' if kinds[0] is int else 'a number'}, got {value!r}")
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ValueError(f"{flag} must be at least {f.metadata['min']}, got {value}")


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


def run_benchmark(parser: argparse.ArgumentParser, argv, measure: Callable, report: Callable):
    """A CPU-threaded benchmark's main: `--threads` and `--json` added, arguments parsed, torch's CPU threads
    set (where `--device` is cpu or absent), then `measure_and_report`."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps ratios stable on a shared CPU (0: torch's default)")
    add_json_output(parser)
    args = parse_args(parser, argv)
    if args.threads and getattr(args, "device", "cpu") == "cpu":
        import torch  # here, not at the top: the entry points' --help stays torch-free
        torch.set_num_threads(args.threads)
    return measure_and_report(args, measure, report)


# What bad input raises (a missing or existing file, a full disk, a wrong value, an unknown name, a transform
# that does not apply to the encoder): the message names the input, so the entry point prints only that.
BAD_INPUT = (OSError, ValueError, KeyError, TypeError)


def early_args(make_arg_parser: Callable[[], argparse.ArgumentParser], module: str) -> Optional[argparse.Namespace]:
    """An entry module's arguments when it runs as `__main__`, parsed before its heavy imports; else None."""
    return parse_args(make_arg_parser(), sys.argv[1:]) if module == "__main__" else None


def run_main(main: Callable, argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> None:
    """Every entry point's `__main__`: bad input exits non-zero with its message, no traceback
    (DTPCLIP_DEBUG=1 keeps the traceback). `args`: arguments `early_args` already parsed."""
    try:
        if args is not None:
            main(args=args)
        else:
            main(sys.argv[1:] if argv is None else argv)
    except BAD_INPUT as e:
        if os.environ.get("DTPCLIP_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"error: {message}")
