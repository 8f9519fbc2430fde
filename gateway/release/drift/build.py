"""A model's monitor from its loaded versions: each version's reference file, profiled."""

from __future__ import annotations

import random

from gateway.release.drift.monitor import ModelMonitor
from gateway.release.drift.profile import VersionProfile, find_reference, load_profile
from gateway.release.drift.window import VersionDrift
from gateway.serving.registry import ModelEntry


def build_monitor(entry: ModelEntry, windows: dict[str, VersionDrift], rng: random.Random) -> ModelMonitor | None:
    """None when monitoring is off or no version has a reference; ConfigError for a reference
    that does not fit its model."""
    spec = entry.spec.monitor
    if not spec.enabled:
        return None
    profiles: dict[str, VersionProfile] = {}
    for version, loaded in entry.versions.items():
        model = loaded.model
        path = find_reference(model.path.parent, spec)
        if path is None:
            continue
        classes = 0
        if entry.spec.compare.kind == "classification":
            compared = model.outputs[entry.spec.compare.output_index(model.output_names, str(path))]
            classes = compared.shape[-1] if len(compared.shape) == 2 and compared.shape[-1] > 1 else 0
        profiles[version] = load_profile(path, model.inputs, entry.spec.max_batch_size > 0, classes, spec)
    if not profiles:
        return None
    # Counts made on other bins (the versions or references before a reload) cannot be compared.
    windows.clear()
    return ModelMonitor(spec, profiles, windows, rng)
