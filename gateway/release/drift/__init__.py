"""Drift and data-quality monitoring of live traffic, per version (docs/drift.md).

features (what a feature is: the stated rule) · profile (a version's reference:
bin edges from its quantiles, range, reference counts) · window (live counts on
the same bins: mergeable across workers) · scoring (PSI, the two-sample test,
Holm across features) · shift (candidate vs stable predictions on the same rows,
for the rollout's max_drift check) · monitor (the hot-path hooks and the report).
"""
