from producers.ingest.run import IngestConfig, IngestError, IngestResult, ingest

__all__ = ["IngestConfig", "IngestError", "IngestResult", "ingest"]
