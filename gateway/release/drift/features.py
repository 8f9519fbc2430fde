"""What a feature is: the stated rule that turns one input tensor's rows into feature columns.

Small rows (at most MAX_ELEMENT_FEATURES elements, e.g. digits' 64 pixels):
every element is a feature, so a report can name the pixel that moved. Larger
rows (images, long token lists): two features per channel, its mean and its
standard deviation over the row, the channel being the row's first axis when
the row has two or more axes and at most MAX_CHANNELS of them (an image's C of
C x H x W), else the whole row as one channel. Integer inputs are read as
numbers; BYTES inputs have no feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ELEMENT_FEATURES = 256
MAX_CHANNELS = 64


@dataclass(frozen=True, slots=True)
class FeatureRule:
    input: str
    row_shape: tuple[int, ...]
    channels: int  # 0: each element is a feature; else per-channel mean and std

    @property
    def elements(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64))

    @property
    def count(self) -> int:
        return 2 * self.channels if self.channels else self.elements

    def names(self) -> list[str]:
        if self.channels:
            return [f"{self.input}[c{c}].{stat}" for stat in ("mean", "std") for c in range(self.channels)]
        if len(self.row_shape) <= 1:
            return [f"{self.input}[{i}]" for i in range(self.count)]
        return [
            f"{self.input}[{','.join(map(str, idx))}]"
            for idx in zip(*np.unravel_index(np.arange(self.count), self.row_shape), strict=True)
        ]

    def features(self, x: np.ndarray, rows: int) -> np.ndarray:
        """(rows, count) feature values of a tensor of `rows` rows (a model without a batch
        dimension: its whole tensor, one row)."""
        flat = x.reshape(rows, -1)
        if not self.channels:
            return flat
        per_channel = flat.reshape(rows, self.channels, -1).astype(np.float64, copy=False)
        return np.concatenate([per_channel.mean(axis=2), per_channel.std(axis=2)], axis=1)


def rule_for(name: str, row_shape: tuple[int, ...]) -> FeatureRule:
    elements = int(np.prod(row_shape, dtype=np.int64))
    if elements <= MAX_ELEMENT_FEATURES:
        return FeatureRule(name, row_shape, 0)
    channels = row_shape[0] if len(row_shape) >= 2 and row_shape[0] <= MAX_CHANNELS else 1
    return FeatureRule(name, row_shape, channels)
