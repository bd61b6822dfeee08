"""An import guard that makes this Python behave, for imports, like the offline GPU machine's.

Installed at start-up by a `sitecustomize.py` on PYTHONPATH (`benchmarks.gpu_bundle` writes one), it
refuses a top-level module that the GPU machine would lack: one that is not in its standard library,
not in its image's packages and not carried in the bundle. A refused `import` raises
ModuleNotFoundError, as on that machine, and `importlib.util.find_spec` answers None for it, so code
that probes for optional packages takes the same branch as there.

Only imports made by the project's own code or by a carried package are judged. An image package's
own imports are allowed (and recorded): the image is consistent with itself, while the versions
installed here differ from its (transformers 5.24 here, 5.17 there) and import other helpers.
Every judged import not allowed is written to the log, one JSON line, also when the caller catches it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

# Standard-library modules Python 3.12 no longer has (PEP 594 / 632): the GPU machine runs 3.12.
REMOVED_IN_312 = frozenset({"distutils", "imp", "asynchat", "asyncore", "smtpd"})
CONFIG_ENV = "LLM4ES_IMPORT_GUARD"


@dataclass(frozen=True)
class GuardConfig:
    project: frozenset[str]  # the checkout's own top-level packages (judged and allowed)
    carried: frozenset[str]  # import names the bundle's wheels provide (judged and allowed)
    image: frozenset[str]  # import names of the image's packages (allowed, not judged)
    log: str  # JSON lines: {"module", "importer", "verdict"}
    stdlib: frozenset[str] = field(default_factory=lambda: frozenset(sys.stdlib_module_names) - REMOVED_IN_312)

    def to_json(self) -> str:
        return json.dumps({"project": sorted(self.project), "carried": sorted(self.carried),
                           "image": sorted(self.image), "log": self.log})

    @classmethod
    def from_json(cls, text: str) -> GuardConfig:
        d = json.loads(text)
        return cls(frozenset(d["project"]), frozenset(d["carried"]), frozenset(d["image"]), d["log"])


def _top(name: str) -> str:
    return name.partition(".")[0]


def _importer() -> str:
    """The module whose code asked for the import: the first frame outside importlib and this file."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith("<frozen importlib") or filename == __file__
                or f"{os.sep}importlib{os.sep}" in filename):
            break
        frame = frame.f_back
    if frame is None:
        return "?"
    g = frame.f_globals
    spec = g.get("__spec__")
    name = g.get("__name__", "?")
    return spec.name if name == "__main__" and spec is not None else name  # `python -m pkg.mod` runs as __main__


class ImportGuard:
    """A meta-path finder that never finds anything: it only refuses, before the real finders look."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.refused: list[tuple[str, str]] = []

    def verdict(self, module: str, importer: str) -> str:
        """'ok'; 'carried' (a module only the bundle's wheels provide: allowed, logged, so the simulation can tell
        which wheels were needed); 'image-internal' (an image package's own import of something else: allowed,
        logged); 'refused'."""
        top, who = _top(module), _top(importer)
        c = self.config
        judged = who in c.project or who in c.carried or who in ("__main__", "?")
        if top in c.carried and top not in c.image:
            return "carried"
        if top in c.stdlib or top in c.project or top in c.image or top in sys.builtin_module_names:
            return "ok"
        return "refused" if judged else "image-internal"

    def _record(self, module: str, importer: str, verdict: str) -> None:
        try:
            with open(self.config.log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"module": module, "importer": importer, "verdict": verdict}) + "\n")
        except OSError:
            pass  # the guard must never be what breaks the run

    def check(self, name: str) -> bool:
        """True when `name` may be imported from where it is being imported now."""
        if "." in name:  # submodules follow their top-level package's verdict
            return True
        importer = _importer()
        v = self.verdict(name, importer)
        if v != "ok":
            self._record(name, importer, v)
        if v == "refused":
            self.refused.append((name, importer))
            return False
        return True

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (the finder protocol)
        if not self.check(name):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine: refused by the import "
                                      f"guard of benchmarks.gpu_bundle)", name=name)
        return None  # let the real finders find it


def install(config: GuardConfig) -> ImportGuard:
    """Put the guard first on sys.meta_path and make `importlib.util.find_spec` answer None for refusals."""
    guard = ImportGuard(config)
    sys.meta_path.insert(0, guard)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):  # noqa: ANN001, ANN202
        full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if "." not in full and not guard.check(full):
            return None
        return real_find_spec(name, package)

    importlib.util.find_spec = find_spec
    return guard


def install_from_env() -> ImportGuard | None:
    text = os.environ.get(CONFIG_ENV)
    return install(GuardConfig.from_json(text)) if text else None
