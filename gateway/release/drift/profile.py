"""A version's reference profile: per feature, bin edges cut at the reference's quantiles,
its range, and the reference's own counts in those bins; the class histogram of its labels.

Each feature has `bins` bins inside its range, cut at the reference quantiles
1/bins .. (bins-1)/bins (ties make some bins empty: a pixel that is 0 in 80 % of
the reference has its first eight edges at 0), plus one bin below and one above
the range [min - m * span, max + m * span] (m = monitor.range_margin): those two
are the out-of-range counts. The edges never change, so live counts on them add
up across requests, windows and worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.config.spec import MonitorSpec
from gateway.errors import ConfigError
from gateway.release.drift.features import FeatureRule, rule_for
from gateway.types import TensorSpec

LABELS_KEY = "y"
SINGLE_INPUT_KEY = "X"  # the reference of a model with one input may use this key


@dataclass(frozen=True, slots=True)
class InputProfile:
    rule: FeatureRule
    edges: np.ndarray  # (features, bins + 1): the range's low end, the inner quantiles, its high end
    reference: np.ndarray  # (features, bins + 2) the reference rows' counts
    offsets: np.ndarray  # (features,) each feature's first slot in a flattened count array

    @property
    def slots(self) -> int:
        return int(self.reference.size)

    def counts(self, x: np.ndarray, rows: int) -> np.ndarray:
        """Flattened (features * (bins + 2)) counts of a tensor's rows."""
        return self.counts_of(self.rule.features(x, rows))

    def counts_of(self, values: np.ndarray) -> np.ndarray:
        """Flattened counts of (rows, features) feature values. Bin b holds values above b
        of the edges: below the range is bin 0, above it the last. NaN compares false and
        would land in bin 0, so callers bin only finite rows."""
        bins = (values[:, :, None] > self.edges[None, :, :]).sum(axis=2)
        return np.bincount((bins + self.offsets).ravel(), minlength=self.slots)


@dataclass(frozen=True, slots=True)
class VersionProfile:
    inputs: Mapping[str, InputProfile]
    classes: np.ndarray | None  # the reference labels' class counts, when it has labels
    source: str  # the reference file, for the report

    @property
    def features(self) -> int:
        return sum(p.rule.count for p in self.inputs.values()) + (self.classes is not None)


def build_input_profile(rule: FeatureRule, rows: np.ndarray, spec: MonitorSpec) -> InputProfile:
    values = rule.features(rows, rows.shape[0]).astype(np.float64)
    finite = values[np.isfinite(values).all(axis=1)]
    if finite.shape[0] < 2:
        raise ValueError(f"input {rule.input!r}: fewer than 2 finite reference rows")
    low, high = finite.min(axis=0), finite.max(axis=0)
    margin = spec.range_margin * (high - low)
    # x >= low - margin is in range; with the "above the edge" rule that is x > nextafter(...).
    below = np.nextafter(low - margin, -np.inf)
    inner = np.quantile(finite, np.arange(1, spec.bins) / spec.bins, axis=0).T
    edges = np.concatenate([below[:, None], inner, (high + margin)[:, None]], axis=1)
    offsets = np.arange(rule.count) * (spec.bins + 2)
    empty = np.zeros((rule.count, spec.bins + 2), dtype=np.int64)
    profile = InputProfile(rule, edges, empty, offsets)
    reference = profile.counts(finite, finite.shape[0]).reshape(rule.count, spec.bins + 2)
    return InputProfile(rule, edges, reference, offsets)


def find_reference(version_dir: Path, spec: MonitorSpec) -> Path | None:
    """`<version>/reference.npz`, else monitor.reference in the model's folder; None: neither."""
    for path in (version_dir / "reference.npz", version_dir.parent / spec.reference):
        if path.is_file():
            return path
    return None


def load_profile(
    path: Path, inputs: Sequence[TensorSpec], batched: bool, classes: int, spec: MonitorSpec
) -> VersionProfile:
    """The profile of one version from its reference file; ConfigError naming the file and
    the array when it does not fit the model's inputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: monitor.reference: not a readable .npz file ({exc})") from None
    profiles: dict[str, InputProfile] = {}
    for tensor in inputs:
        if tensor.datatype == "BYTES":
            continue
        key = tensor.name if tensor.name in arrays else SINGLE_INPUT_KEY if len(inputs) == 1 else tensor.name
        if key not in arrays:
            raise ConfigError(f"{path}: monitor.reference: no array {tensor.name!r} for input {tensor.name!r}")
        rows = arrays[key]
        row_dims = tensor.shape[1:] if batched else tensor.shape
        data_dims = rows.shape[1:]
        if len(row_dims) != len(data_dims) or any(d not in (-1, n) for d, n in zip(row_dims, data_dims, strict=True)):
            raise ConfigError(
                f"{path}: monitor.reference: array {key!r} has rows of shape {list(data_dims)}, "
                f"input {tensor.name!r} takes {list(row_dims)}"
            )
        try:
            profiles[tensor.name] = build_input_profile(rule_for(tensor.name, tuple(data_dims)), rows, spec)
        except ValueError as exc:
            raise ConfigError(f"{path}: monitor.reference: {exc}") from None
    labels = arrays.get(LABELS_KEY)
    class_counts = None
    if labels is not None and classes > 0 and np.issubdtype(labels.dtype, np.integer):
        class_counts = np.bincount(np.clip(labels.ravel(), 0, classes - 1), minlength=classes)
    return VersionProfile(profiles, class_counts, str(path))
