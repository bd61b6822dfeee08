"""The home's Feast repo: its folder, its project, its yaml files, and the temp files killed publishes left."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

from producers.publish.manifest import _slug
from producers.stores.serving import PublishError, feast_dir, repo_dir
from producers.stores.warehouse import Home

Log = Callable[[str], None]


REPO_FILES = ("definitions.py", "registry_store.py")  # copied as they are


TEMPLATES = {"feature_store.yaml": "feature_store.template.yaml",  # written with the home's project
             "feature_store.redis.yaml": "feature_store.redis.template.yaml"}


PROJECT_ENV = "LLM4ES_FEAST_PROJECT"


def package_repo_dir() -> Path:
    """The llm4es package's own `feature_repo` folder (in a checkout: `<checkout>/feature_repo`)."""
    try:
        import feature_repo
    except ImportError:  # an editable install made before the package existed: it sits beside producers/
        return Path(__file__).resolve().parent.parent / "feature_repo"
    return Path(feature_repo.__file__).resolve().parent


def _definitions():
    """`feature_repo.definitions`, imported as a package module (so it only offers `build`)."""
    try:
        from feature_repo import definitions
    except ImportError:
        import importlib.util
        import sys

        name = "feature_repo.definitions"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, package_repo_dir() / "definitions.py")
        definitions = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(definitions)
        sys.modules[name] = definitions
    return definitions


def default_project(home: Home) -> str:
    """`llm4es_<folder>_<hash of the home's path>`: two homes never share a project by accident."""
    digest = hashlib.sha256(str(home.root).encode()).hexdigest()[:8]
    return f"llm4es_{_slug(home.root.name)[:24]}_{digest}"


def repo_project(home: Home) -> str | None:
    """The project the home's repo yaml names, if publish wrote it (a yaml of an older llm4es, which
    named the shared project `llm4es` for every home, does not count)."""
    path = repo_dir(home) / "feature_store.yaml"
    if not path.is_file():
        path = repo_dir(home) / "feature_store.redis.yaml"
    if not path.is_file():
        return None
    text = path.read_text()
    found = re.search(r"^project:\s*(\S+)\s*$", text, re.M)
    return found.group(1) if found and "registry_store_type" in text else None


def feast_project(home: Home, wanted: str | None = None) -> str:
    """The Feast project to publish to: `wanted`, else $LLM4ES_FEAST_PROJECT, else the one the home's repo
    already uses, else `default_project`."""
    name = wanted or os.environ.get(PROJECT_ENV) or repo_project(home) or default_project(home)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", name):
        origin = "--project" if wanted else PROJECT_ENV if os.environ.get(PROJECT_ENV) else "the home"
        raise PublishError(f"Feast project {name!r}: use letters, digits and underscores, starting with a letter "
                           f"or digit (from {origin})")
    return name


def ensure_repo(home: Home, project: str | None = None, log: Log = lambda _: None) -> Path:
    """`<home>/feature_repo` with the package's repo files in it and its yaml files naming `project`
    (default: `feast_project(home)`). In the checkout itself only the yaml files are written (not tracked)."""
    repo, package = repo_dir(home), package_repo_dir()
    project = project or feast_project(home)
    repo.mkdir(parents=True, exist_ok=True)
    wanted = {}
    if repo.resolve() != package:
        for name in REPO_FILES:
            src = package / name
            if not src.is_file():
                raise PublishError(f"the llm4es package lacks {src}")
            wanted[name] = src.read_bytes()
    for name, template in TEMPLATES.items():
        src = package / template
        if not src.is_file():
            raise PublishError(f"the llm4es package lacks {src} (add feature_repo/*.yaml to its package data)")
        text = re.sub(r"^project:.*$", f"project: {project}", src.read_text(), count=1, flags=re.M)
        wanted[name] = text.encode()
    for name, content in wanted.items():
        dst = repo / name
        if dst.is_file() and dst.read_bytes() == content:
            continue
        log(f"{'updating' if dst.exists() else 'writing'} {dst}")
        tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, dst)
    return repo


def _clean_orphans(home: Home, log: Log) -> None:
    """Remove the temp files of publishes (and registry writes) that were killed: `.<name>.<pid>.tmp`
    and `.<registry>.<pid>.staging` whose process is gone."""
    found = [*feast_dir(home).rglob(".*.tmp"), *feast_dir(home).glob(".*.staging"), *repo_dir(home).glob(".*.tmp")]
    for path in found:
        pid = re.search(r"\.(\d+)\.(?:tmp|staging)$", path.name)
        if pid and _alive(int(pid.group(1))):
            continue
        log(f"removing {path}, left by a publish that did not finish")
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call of this process: nothing of it is running now (we hold the lock)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
