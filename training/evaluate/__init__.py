"""Downstream evaluation (`llm4es evaluate`): protocols, the run over Feast features, reports."""
from training.evaluate.run import EvaluateConfig, EvaluateError, EvaluateResult, evaluate

__all__ = ["EvaluateConfig", "EvaluateError", "EvaluateResult", "evaluate"]
