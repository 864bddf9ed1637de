"""Keeping served tasks healthy: drift statistics against each task's reference profile, live quality from
feedback (store.py), and the offline reports."""
