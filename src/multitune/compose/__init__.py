"""Composition of tasks over one base: merging task adapters (merge.py, run.py: ``multitune merge``)."""
