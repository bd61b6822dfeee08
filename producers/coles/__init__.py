"""CoLES user embeddings ("coles", the LLM4ES paper's strongest baseline), trained with pytorch-lifestream.

`coles(home, dataset, config, log)` reads every user's events up to `as_of` (default: the last
event) with one DuckDB query (`records.py`: categorical fields as frequency-ranked codes, numeric
fields as sign(x)*ln(1+|x|), plus ln(1 + days since the previous event); text fields are not
used), trains a ptls CoLES encoder on them (`train.py`: TrxEncoder -> GRU, CoLESModule,
ColesDataset + SampleSlices, a Lightning Trainer), and writes one vector per user
(`produce.py`):

- `"<schema>".coles_embeddings`: user_id (the dataset's user type), vector FLOAT[], dim INTEGER,
  model VARCHAR (`coles-gru-<hidden_size>`), checkpoint VARCHAR (the checkpoint file, relative to
  the home), epoch INTEGER (epochs trained), feature_timestamp TIMESTAMP (= as_of: the
  point-in-time key), produced_at TIMESTAMP, source_hash VARCHAR (the ingest's data version),
  code_version VARCHAR; built as a staging table and swapped in;
- `data/<schema>/coles_embeddings.parquet`: the same rows, written to a temp file and renamed,
  with the provenance (config, data version, vocabulary, versions of ptls/torch/Lightning, epochs,
  per-epoch losses) as JSON under the Parquet key-value metadata key `llm4es`.

Runs live in `runs/<schema>/coles/<run_key>/` (`config.json`, `state.json`,
`checkpoints/epoch-NNN.ckpt`, one per epoch). The run key hashes the config (all but epochs,
device, threads, num_workers, force, resume, progress), the records and the definition, so: the same call
after an interruption resumes from the last checkpoint; asking for more epochs continues the run;
asking for epochs a run already has reuses that checkpoint and only re-embeds.

Every user with at least one event is embedded: training slices need no minimum length
(ptls's SampleSlices repeats a short sequence), and inference takes any length >= 1.

torch, Lightning and ptls are imported only when `coles` runs.
"""
from producers.coles.config import ColesConfig, ColesError, ColesResult
from producers.coles.produce import TABLE, coles, read_provenance

__all__ = ["TABLE", "ColesConfig", "ColesError", "ColesResult", "coles", "read_provenance"]
