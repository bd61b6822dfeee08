"""Find a dataset's raw files in what the user gave (`--source` folder or zip) and hash them."""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from producers.errors import Llm4esError
from producers.stores.cache import sha256_file
from producers.datasets.definition import DatasetDefinition


class SourceError(Llm4esError, FileNotFoundError):
    """A raw file the definition needs is missing from the source."""


@dataclass(frozen=True)
class SourceFile:
    table: str
    path: Path
    sha256: str

    @property
    def is_parquet(self) -> bool:
        return ".parquet" in self.path.name.lower() or self.path.suffix.lower() == ".pq"


def unpack_if_zip(source: Path, scratch: Path) -> Path:
    """A zip (as GroupLens ships MovieLens) is unpacked into `scratch`; a folder is used as is."""
    if source.is_dir():
        return source
    if zipfile.is_zipfile(source):
        scratch.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(source) as zf:
            zf.extractall(scratch)
        return scratch
    if source.is_file():
        return source.parent  # a single file names its folder
    raise SourceError(f"source {source} does not exist")


def locate(definition: DatasetDefinition, folder: Path) -> dict[str, SourceFile]:
    """Each declared table's file: the first candidate name found anywhere under `folder`.

    Only files under `folder` are read: the definition refuses absolute paths and `..`, and a
    symbolic link that leads outside the folder is refused here (a shared mapping must not
    reach the rest of the machine).
    """
    found: dict[str, SourceFile] = {}
    root = folder.resolve()
    for table, spec in definition.tables.items():
        path = _first_match(folder, spec.candidates)
        if path is None:
            raise SourceError(
                f"{definition.name}: table {table!r} needs one of {spec.candidates} under {folder}, found none"
            )
        real = path.resolve()
        if not real.is_relative_to(root):
            raise SourceError(
                f"{definition.origin}: tables.{table}.file: {path} leads to {real}, outside the source folder "
                f"{folder}; a mapping may only read files under --source (copy the file there)")
        found[table] = SourceFile(table, path, sha256_file(path))
    return found


def _first_match(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        direct = folder / name
        if direct.is_file():
            return direct
        matches = sorted(p for p in folder.rglob(Path(name).name) if p.is_file())
        if matches:
            return matches[0]
    return None


def source_hash(files: dict[str, SourceFile]) -> str:
    """One hash for the whole source: the data version recorded with every output."""
    h = hashlib.sha256()
    for table in sorted(files):
        h.update(f"{table}:{files[table].sha256}\n".encode())
    return h.hexdigest()[:16]
