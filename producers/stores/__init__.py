"""Stores: the DuckDB warehouse, the texts table, feature outputs, caches, locks and provenance.

The bottom layer: nothing here imports a stage, the shared model layer or the CLI.
"""
