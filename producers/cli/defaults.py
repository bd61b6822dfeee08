"""Config dataclasses' field defaults, read from their source file without importing it.

The modules that define the stage configs import DuckDB, pandas, pyarrow or torch when they load
(1-2 s together); `llm4es --help`, a subcommand's `--help` and a mistyped option must not pay for
that. The dataclass stays the one place a default is written: `config_defaults` reads the class
body with `ast`, and tests/cli/test_help_imports.py checks every option default against the
imported class, so a default read wrong fails a test, not a user.

What it reads: a field's default when it is a literal (`epochs: int = 5`, `lr: float = 1e-3`,
`x: str | None = None`, or `field(default=...)` around one), or a module-level name bound to a
literal in that module or imported (`from m import NAME`) from one. Anything else (a call, an
expression) is not read: asking for it raises, naming the class, the field and the file.

Only the statements needed are parsed (the class, the module's `from` imports and the name's
assignment), not whole modules: parsing every config module costs more than the rest of `--help`.
A statement that does not parse on its own falls back to parsing its whole file.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any


class ConfigDefaults:
    """The literal defaults of one dataclass, as attributes (`defaults.epochs`), like the class's own."""

    def __init__(self, qualname: str, path: Path, values: dict[str, Any]):
        self._qualname, self._path, self._values = qualname, path, values

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"{self._qualname}.{name} has no literal default in {self._path}") from None


def config_defaults(module: str, cls: str) -> ConfigDefaults:
    """The literal field defaults of dataclass `cls` defined in `module` (a dotted module name)."""
    path = module_file(module)
    nodes = _statements(path, rf"class\s+{cls}\b")
    node = nodes[0] if nodes else None
    if not isinstance(node, ast.ClassDef) or node.name != cls:
        raise LookupError(f"no class {cls} at the top level of {path}")
    values = {}
    for field in node.body:
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and field.value is not None:
            found, value = _value(module, _unwrap_field(field.value))
            if found:
                values[field.target.id] = value
    return ConfigDefaults(f"{module}.{cls}", path, values)


def module_constant(module: str, name: str) -> Any:
    """The literal `module.name` (a module-level constant), read like the config defaults."""
    found, value = _module_constant(module, name)
    if not found:
        raise LookupError(f"{module}.{name} is not a literal constant in {module_file(module)}")
    return value


def module_file(module: str) -> Path:
    """The source file of `module`, found without importing it or its packages (their __init__ may be heavy)."""
    top, *rest = module.split(".")
    # The top-level package through every finder (an editable install has its own); importing a
    # submodule would run its packages' __init__, so below it only the path finder, on their folders.
    spec = importlib.util.find_spec(top)
    for i in range(len(rest)):
        if spec is None or not spec.submodule_search_locations:
            break
        spec = PathFinder.find_spec(".".join([top, *rest[: i + 1]]), list(spec.submodule_search_locations))
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source file for module {module!r} to read config defaults from")
    return Path(spec.origin)


@cache
def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(_source(path), filename=str(path))


def _statements(path: Path, start: str) -> list[ast.stmt]:
    """The top-level statements of `path` whose first line matches regex `start`, in file order."""
    text = _source(path)
    found = []
    for match in re.finditer(rf"^(?:{start})", text, re.M):
        try:
            found += ast.parse(text[match.start():_statement_end(text, match.start())]).body
        except SyntaxError:  # e.g. a string in it with lines at column 0: read the whole file
            return [node for node in _parse(path).body
                    if re.match(start, ast.get_source_segment(text, node) or "")]
    return found


# A line that starts a new top-level statement: code at column 0 that is not a comment, nor the bracket
# closing a multi-line import or literal.
_STATEMENT_START = re.compile(r"^[^\s#)\]}]", re.M)


def _statement_end(text: str, start: int) -> int:
    """Where the top-level statement that begins at `start` ends."""
    line_end = text.find("\n", start)
    match = _STATEMENT_START.search(text, line_end + 1) if line_end >= 0 else None
    return match.start() if match else len(text)


def _unwrap_field(expr: ast.expr) -> ast.expr | None:
    """`field(default=X)` -> X; `field(default_factory=...)` -> None (no literal default)."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "field":
        return next((kw.value for kw in expr.keywords if kw.arg == "default"), None)
    return expr


def _value(module: str, expr: ast.expr | None) -> tuple[bool, Any]:
    if expr is None:
        return False, None
    if isinstance(expr, ast.Name):
        return _module_constant(module, expr.id)
    try:
        return True, ast.literal_eval(expr)
    except (ValueError, TypeError):
        return False, None


@cache
def _module_constant(module: str, name: str) -> tuple[bool, Any]:
    """`name` bound at `module`'s top level to a literal, or imported there from a module that binds it so."""
    for node in _statements(module_file(module), rf"from\s+[\w.]+\s+import\b|{re.escape(name)}\s*[:=]"):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _module_constant(node.module, alias.name)
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(isinstance(t, ast.Name) and t.id == name
                                                                 for t in targets):
            # A name bound to another name is not followed (no chains, no cycles).
            return (False, None) if isinstance(node.value, ast.Name) else _value(module, node.value)
    return False, None
