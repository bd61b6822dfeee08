"""Downstream evaluation (`llm4es evaluate`): protocols, the run over Feast features, reports."""
from training.evaluate.fusion import FusionConfig
from training.evaluate.run import EvaluateConfig, EvaluateError, EvaluateResult, evaluate

__all__ = ["EvaluateConfig", "FusionConfig", "EvaluateError", "EvaluateResult", "evaluate"]
