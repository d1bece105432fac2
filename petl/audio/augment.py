"""SpecAugment (Park et al. 2019): frequency and time masking of normalised filter banks.

The masking follows torchaudio's ``FrequencyMasking`` / ``TimeMasking`` (what the PETL-AST code
applies): a mask width w ~ U[0, param), a start ~ U[0, size - w), the band set to 0 (the mean
after normalisation). PETL-AST uses one frequency mask of up to 24 bins and one time mask of up
to 80 frames on ESC-50 and UrbanSound8K only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def mask_along(features: torch.Tensor, param: int, dim: int, generator: Optional[torch.Generator] = None,
               value: float = 0.0) -> torch.Tensor:
    """One random band of width < ``param`` along ``dim`` of ``features`` set to ``value`` (a copy)."""
    size = features.shape[dim]
    if param <= 0 or size == 0:
        return features
    u = torch.rand(2, generator=generator)
    width = int(u[0] * min(param, size))
    start = int(u[1] * (size - width))
    out = features.clone()
    out.narrow(dim, start, width).fill_(value)
    return out


@dataclass
class SpecAugment:
    """Masks for one example ``[frames, mel]``.

    Args:
        freq_mask (int): maximum width of a frequency mask (0 disables). Default: 0.
        time_mask (int): maximum width of a time mask (0 disables). Default: 0.
        num_freq_masks, num_time_masks (int): masks of each kind. Default: 1.
    """

    freq_mask: int = 0
    time_mask: int = 0
    num_freq_masks: int = 1
    num_time_masks: int = 1

    def __post_init__(self) -> None:
        if min(self.freq_mask, self.time_mask, self.num_freq_masks, self.num_time_masks) < 0:
            raise ValueError("SpecAugment widths and counts must be >= 0")

    @property
    def active(self) -> bool:
        return (self.freq_mask > 0 and self.num_freq_masks > 0) or (self.time_mask > 0 and self.num_time_masks > 0)

    def __call__(self, features: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        for _ in range(self.num_freq_masks):
            features = mask_along(features, self.freq_mask, dim=-1, generator=generator)
        for _ in range(self.num_time_masks):
            features = mask_along(features, self.time_mask, dim=-2, generator=generator)
        return features
