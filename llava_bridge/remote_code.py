"""The remote-code export's model code, made self-contained: every dtpclip / llava_bridge module the
exported model imports, copied flat into the export directory with its imports made relative.

Hugging Face's remote code loads one file and the files it imports relatively (`from .name import
...`), all from the model directory (transformers' dynamic_module_utils), so a package tree cannot
be shipped as is. Here `llava_bridge.hf_model` and its first-party imports, followed transitively,
become `llava_bridge_hf_model.py`, `dtpclip_encoders_dtp.py`, ...; `import dtpclip.encoders`
(the package that registers every family and transform) becomes one relative import per module
of that package. What the copies import from elsewhere is torch, transformers, timm and their own
dependencies (safetensors, PyYAML), which `trust_remote_code` checks for before loading.
"""
import ast
import importlib.util
from pathlib import Path
from typing import Dict, List

FIRST_PARTY = ("dtpclip", "llava_bridge")
ENTRY = "llava_bridge.hf_model"


def flat_name(module: str) -> str:
    return module.replace(".", "_")


def _spec_origin(module: str):
    spec = importlib.util.find_spec(module)
    return spec.origin, spec.submodule_search_locations is not None


def _package_modules(package: str) -> List[str]:
    """The modules of a package directory (not its __init__), sorted."""
    directory = Path(_spec_origin(package)[0]).parent
    return [f"{package}.{path.stem}" for path in sorted(directory.glob("*.py")) if path.stem != "__init__"]


def _is_first_party(module) -> bool:
    return module is not None and module.split(".")[0] in FIRST_PARTY


def _imported_modules(node) -> List[str]:
    """The first-party modules an import statement loads (a package stands for all its modules)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names if _is_first_party(alias.name)]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_first_party(node.module):
        if not _spec_origin(node.module)[1]:
            return [node.module]
        names = [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return []
    modules = []
    for name in names:
        modules += _package_modules(name) if _spec_origin(name)[1] else [name]
    return modules


def _rewritten(node, source_lines: List[str]) -> str:
    """The statement with its first-party imports relative to the flat copies."""
    indent = source_lines[node.lineno - 1][: node.col_offset]
    if isinstance(node, ast.ImportFrom) and not _spec_origin(node.module)[1]:
        names = ", ".join(alias.name + (f" as {alias.asname}" if alias.asname else "") for alias in node.names)
        return f"{indent}from .{flat_name(node.module)} import {names}"
    lines = [f"{indent}from .{flat_name(module)} import __name__ as _  # noqa: F401  (for its registrations)"
             for module in _imported_modules(node)]
    return "\n".join(lines)


def vendored_sources(entry: str = ENTRY) -> Dict[str, str]:
    """{flat file name: source with relative imports} for `entry` and everything first-party it imports."""
    files, pending = {}, [entry]
    while pending:
        module = pending.pop()
        if flat_name(module) + ".py" in files:
            continue
        source = Path(_spec_origin(module)[0]).read_text()
        lines = source.splitlines()
        edits = []
        for node in ast.walk(ast.parse(source)):
            imported = _imported_modules(node)
            if imported:
                pending += imported
                edits.append((node.lineno, node.end_lineno, _rewritten(node, lines)))
        for first, last, text in sorted(edits, reverse=True):
            lines[first - 1: last] = [text]
        files[flat_name(module) + ".py"] = "\n".join(lines) + "\n"
    return files


def write_remote_code(out_dir: Path, entry: str = ENTRY) -> str:
    """Write the flat copies into `out_dir`; returns the entry's module name for `auto_map`."""
    for name, text in vendored_sources(entry).items():
        (Path(out_dir) / name).write_text(text)
    return flat_name(entry)
