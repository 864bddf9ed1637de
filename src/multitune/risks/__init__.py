"""The risks seed 001 names, measured per task (issue 18): bias (counterfactual and invariance audits, group
metrics, counterfactual augmentation), leaks of training data (differential privacy, membership inference,
canaries) and factual regressions (golden sets, self-consistency)."""
