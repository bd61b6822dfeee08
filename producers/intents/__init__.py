"""Interpretable session intents ("From Clicks to Intent"; the TnT-LLM recipe), in three stages.

1. `build_taxonomy` (`llm4es intents build`): an instruct LLM summarises sampled sessions, proposes
   at most `max_labels` intent labels (`name: description`) and refines them over further samples;
   stored as a new version in `"<schema>".intent_taxonomies` and `reports/intents/<schema>/taxonomy-v<N>.md`.
2. `label_sessions` (`llm4es intents label`): the LLM gives a deterministic sample of sessions one
   label each (generate mode: parsed from its answer; score mode: the most likely label name),
   cached and resumable in `"<schema>".intent_llm_labels`.
3. `distill_intents` (`llm4es intents distill`): a light classifier on session embeddings + cheap
   session features learns the LLM's labels; held-out micro/macro F1 against the LLM and latency of
   both, measured in one run; every session's label and probabilities go to
   `"<schema>".session_intents` and `data/<schema>/session_intents.parquet`. The fitted classifier is
   saved (`classify.save_classifier`), so `classify.classify_sessions` labels new sessions with it (a
   refresh: no LLM, no re-fitting; their rows replaced in place, the Parquet copy written again from the
   table before a full publish).

Sessions are read from the `sessions` / `session_events` tables (`llm4es sessions build`) and
shown to the LLM as compact text (`session_text`). torch, transformers and scikit-learn are
imported only when a stage runs.
"""
from producers.intents.config import (
    DistillConfig,
    DistillResult,
    IntentsError,
    LabelConfig,
    LabelResult,
    TaxonomyConfig,
    TaxonomyResult,
    TextConfig,
)
from producers.intents.distill import TABLE, distill_intents, read_provenance
from producers.intents.label import label_sessions
from producers.intents.prompts import PROMPTS, Label, parse_label, parse_taxonomy
from producers.intents.session_text import format_session, read_session_texts, sample_sessions
from producers.intents.taxonomy import build_taxonomy, import_taxonomy

__all__ = ["PROMPTS", "TABLE", "DistillConfig", "DistillResult", "IntentsError", "Label", "LabelConfig", "LabelResult",
           "TaxonomyConfig", "TaxonomyResult", "TextConfig", "build_taxonomy", "import_taxonomy", "distill_intents",
           "format_session", "label_sessions", "parse_label", "parse_taxonomy", "read_provenance", "read_session_texts",
           "sample_sessions"]
