"""`llm4es embed`: user embeddings from a causal LLM's hidden states (paper §2, "Embeddings Extraction").

For each user text: the hidden states of the selected layers are averaged (mean over layers),
then averaged over the text's real tokens (the attention mask), in float32. The default layer
range is the authors' `hidden_states[9:]` of `output_hidden_states=True`, where index 0 is the
embedding output and the last index is the final (normed) hidden state.

The vector does not depend on how texts are batched: padding never reaches a real token (right
padding sits after every real token under the causal mask, so no mask is sent; left padding is
masked, with positions counted from the mask) and is left out of the mean, so left padding gives
what right padding gives.

How a run is laid out (per embeddings *set* = one model, checkpoint, layer range and text kind):

- `data/<schema>/embeddings_parts/<run_key>/batch-00012.parquet`: one file per batch, written
  atomically (temp file, then rename) as soon as the batch is done; `run.json` beside them holds
  what the run key was computed from. `run_key` hashes the model, checkpoint, layers, text kind
  and variant, max length, truncation, dtype and the texts themselves, so a run resumed after a
  crash reuses exactly the parts made from the same inputs and skips the users they hold.
- at the end the parts are merged into the DuckDB table `"<schema>".embeddings` in one
  transaction (rows with the same key `(user_id, model, checkpoint, layers, text_kind)` are
  replaced; a run over all users replaces the whole set), and the parts folder is deleted;
- the set is exported to `data/<schema>/embeddings/<model>__<checkpoint>__L<a>-<b>__<kind>-<hash>.parquet`
  (one file per set, so one file per epoch of a fine-tuning run), with the run's provenance as
  JSON under the `llm4es` key of the Parquet key-value metadata.

Column meanings: `feature_timestamp` is the time of the dataset's last event (the texts cover
every event up to it), the key a feature store uses for point-in-time joins; `model` is the model
asked for, or for a fine-tuned checkpoint the base model its `llm4es_checkpoint.json` names
(`model_source`); `checkpoint` is `base` for the model without fine-tuning, else the checkpoint
folder relative to the home directory (absolute when outside it); `layers` is the resolved
hidden-state range `start:stop` (e.g. `9:31` for SmolLM2-135M's 31 hidden states), so `9:` and
`-22:` name the same set.

The package, top down: `run` (the stage) uses `store` (warehouse in and out), `parts` (resumable part
files), `ranks` (several processes), `batches` (token budgets), `embedder` (the model), `checkpoints`
and `layers`; `config` holds the config and results. torch and transformers are imported lazily: the
CLI reads `config` for its defaults without importing any of this.
"""
from training.embed.batches import choose_batch_tokens, measure_batch_tokens, plan_batches
from training.embed.checkpoints import BASE_CHECKPOINT, CHECKPOINT_FILE, Checkpoint, find_checkpoints
from training.embed.config import (
    AUTO_MAX_TOKENS,
    CPU_BATCH_TOKENS,
    POOLING,
    POOLINGS,
    TABLE,
    EmbedConfig,
    EmbedError,
    EmbedResult,
    EmbedSet,
    pooling_description,
)
from training.embed.embedder import Embedder, Encoded, Launched, pick_device, pick_dtype
from training.embed.layers import layers_label, n_decoder_layers, n_hidden_states, resolve_layers
from training.embed.ranks import shard_users
from training.embed.run import embed
from training.embed.store import ensure_table, parquet_path

__all__ = [
    "AUTO_MAX_TOKENS", "BASE_CHECKPOINT", "CHECKPOINT_FILE", "CPU_BATCH_TOKENS", "POOLING", "POOLINGS", "TABLE",
    "Checkpoint", "EmbedConfig", "EmbedError", "EmbedResult", "EmbedSet", "Embedder", "Encoded", "Launched",
    "choose_batch_tokens", "embed", "ensure_table", "find_checkpoints", "layers_label", "measure_batch_tokens",
    "n_decoder_layers", "n_hidden_states", "parquet_path", "pick_device", "pick_dtype", "plan_batches",
    "pooling_description", "resolve_layers", "shard_users",
]
