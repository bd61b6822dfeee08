"""The model and text layer shared by producers and training: LLM registry and tokenizer,
text mixtures, device choice, as-of dates. Points only down, to the stores.
"""
