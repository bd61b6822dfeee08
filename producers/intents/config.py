"""What the intent stages are asked to do (configs), what they did (results), and their error type.

No torch, no scikit-learn here: the CLI imports this module for its options.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from producers.enrich.options import LLMOptions
from producers.errors import Llm4esError
from producers.shared.redact import redacted


class IntentsError(Llm4esError, RuntimeError):
    """An intent stage cannot run as asked (a missing table, too few labels, a bad config value)."""


# Short, nearly deterministic answers: a taxonomy of 8 one-line labels fits in ~300 tokens, a
# summary sentence in ~60. A little sampling (not greedy) lets later rounds phrase things anew.
TAXONOMY_LLM = LLMOptions(temperature=0.3, top_p=0.9, max_new_tokens=320, batch_size=4)
# One label name is a handful of tokens; 24 leave room for "The label is: ..." answers. The local
# back end samples, so the temperature is low but positive (transformers refuses 0 with sampling).
LABEL_LLM = LLMOptions(temperature=0.1, top_p=0.9, max_new_tokens=24, batch_size=4)

Mode = Literal["generate", "score"]


def _whole(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise IntentsError(f"{name} must be a whole number of at least {low}, not {value!r}")


@dataclass(frozen=True)
class TextConfig:
    """How a session becomes prompt text (`session_text`)."""

    max_events: int = 30  # the session's first events: where the visitor's goal shows
    max_chars: int = 2500  # ~800 tokens: the prompt stays small for a CPU

    def check(self) -> None:
        _whole("max_events", self.max_events, 1)
        _whole("max_chars", self.max_chars, 100)


@dataclass(frozen=True)
class TaxonomyConfig:
    sample_size: int = 20  # sessions summarised per round
    rounds: int = 3  # round 1 proposes a taxonomy, every later round refines it on new sessions
    max_labels: int = 8
    seed: int = 0  # which sessions are sampled (md5 of session id and seed) and the LLM's seeds
    min_events: int = 1  # sessions shorter than this are not sampled
    llm: LLMOptions = TAXONOMY_LLM
    text: TextConfig = TextConfig()
    progress: bool | None = None  # tqdm bars; None: only on a terminal

    def check(self) -> None:
        _whole("sample_size", self.sample_size, 1)
        _whole("rounds", self.rounds, 1)
        _whole("max_labels", self.max_labels, 2)
        _whole("min_events", self.min_events, 1)
        _whole("seed", self.seed, 0)
        self.text.check()

    def as_dict(self) -> dict[str, Any]:
        return redacted(asdict(self))  # recorded with the results: no endpoint credentials


@dataclass(frozen=True)
class LabelConfig:
    sample_size: int | None = 1000  # sessions labelled; 0 or None: every session
    taxonomy_version: int | None = None  # None: the newest
    mode: Mode = "generate"  # generate: the model writes a label name; score: the most likely name (local only)
    score_norm: Literal["sum", "mean"] = "sum"  # score mode: total or per-token log-likelihood of a name
    seed: int = 0  # which sessions are sampled, and the LLM's seeds
    min_events: int = 1
    llm: LLMOptions = LABEL_LLM
    text: TextConfig = TextConfig()
    progress: bool | None = None

    def check(self) -> None:
        if self.sample_size is not None:
            _whole("sample_size", self.sample_size, 0)
        if self.taxonomy_version is not None:
            _whole("taxonomy_version", self.taxonomy_version, 1)
        if self.mode not in ("generate", "score"):
            raise IntentsError(f"mode must be 'generate' or 'score', not {self.mode!r}")
        if self.score_norm not in ("sum", "mean"):
            raise IntentsError(f"score_norm must be 'sum' or 'mean', not {self.score_norm!r}")
        if self.mode == "score" and self.llm.backend != "local":
            raise IntentsError("score mode reads the model's token probabilities: it needs the local back end, "
                               f"not {self.llm.backend!r}")
        _whole("seed", self.seed, 0)
        _whole("min_events", self.min_events, 1)
        self.text.check()

    def as_dict(self) -> dict[str, Any]:
        return redacted(asdict(self))  # recorded with the results: no endpoint credentials


@dataclass(frozen=True)
class DistillConfig:
    taxonomy_version: int | None = None  # None: the newest that has LLM labels
    classifier: Literal["logreg", "lightgbm"] = "logreg"
    C: float = 1.0  # logreg: inverse L2 strength
    max_iter: int = 2000
    class_weight_balanced: bool = True  # rare intents weigh as much as common ones
    top_values: int = 5  # per categorical events field: shares of its most frequent values
    test_share: float = 0.25  # held-out sessions (stratified by the LLM's label)
    seed: int = 0
    llm_latency_sessions: int = 8  # held-out sessions sent through the LLM again to time it (0: skip)
    mode: Mode | None = None  # how the LLM is timed; None: the mode most cached labels were made with
    llm: LLMOptions = LABEL_LLM
    text: TextConfig = TextConfig()
    progress: bool | None = None

    def check(self) -> None:
        if self.taxonomy_version is not None:
            _whole("taxonomy_version", self.taxonomy_version, 1)
        if self.classifier not in ("logreg", "lightgbm"):
            raise IntentsError(f"classifier must be 'logreg' or 'lightgbm', not {self.classifier!r}")
        if not 0 < self.test_share < 1:
            raise IntentsError(f"test_share must be in (0, 1), not {self.test_share!r}")
        if not self.C > 0:
            raise IntentsError(f"C must be positive, not {self.C!r}")
        _whole("max_iter", self.max_iter, 1)
        _whole("top_values", self.top_values, 0)
        _whole("seed", self.seed, 0)
        _whole("llm_latency_sessions", self.llm_latency_sessions, 0)
        if self.mode not in (None, "generate", "score"):
            raise IntentsError(f"mode must be 'generate', 'score' or None, not {self.mode!r}")
        self.text.check()

    def as_dict(self) -> dict[str, Any]:
        return redacted(asdict(self))  # recorded with the results: no endpoint credentials


@dataclass
class TaxonomyResult:
    dataset: str
    version: int
    labels: list[dict[str, str]]  # [{name, description}] in the taxonomy's order
    rounds: list[dict[str, Any]]  # per round: sessions sampled, labels proposed, kept_previous
    report_path: Path
    backend: str
    model: str
    prompt_version: str
    llm_calls: int
    seconds: float


@dataclass
class LabelResult:
    dataset: str
    taxonomy_version: int
    mode: str
    backend: str
    model: str
    sampled: int  # sessions in the sample
    labelled: int  # with a taxonomy label (fresh + cached)
    unparsable: int  # answers kept with label NULL (fresh + cached)
    from_cache: int
    generated: int  # answers obtained in this call
    distribution: dict[str, int]  # label -> sessions (NULL as "<unparsable>")
    llm_seconds_per_session: float | None  # mean over this call's answers
    seconds: float
    failed: int = 0  # back-end errors (not cached: asked again next run)


@dataclass
class DistillResult:
    dataset: str
    taxonomy_version: int
    classifier: str
    labels: list[str]  # the taxonomy's label order (= the probabilities' order)
    trained_labels: list[str]  # labels with enough examples to learn
    n_labelled: int
    n_train: int
    n_test: int
    micro_f1: float
    macro_f1: float
    accuracy: float
    per_label_f1: dict[str, float]
    confusion: list[list[int]]  # rows: the LLM's label, columns: the classifier's, in `trained_labels` order
    classifier_seconds_per_session: float  # predict_proba, one session at a time, features ready
    llm_seconds_per_session: float | None  # measured in this call on `llm_sessions` held-out sessions
    llm_sessions: int
    llm_cached_seconds_per_session: float | None  # mean latency recorded in the label cache
    n_predicted: int  # rows of session_intents
    table: str
    parquet_path: Path
    report_json: Path
    report_md: Path
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)
