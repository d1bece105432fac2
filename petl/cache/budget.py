"""The H2O budget: how many heavy-hitter and recent KV entries each head keeps.

A budget half is given either as an absolute count (``heavy=64``) or as a fraction of the prompt
(``heavy_ratio=0.1``). Fractions can only be turned into counts once the prompt length is known,
so :class:`H2OBudget` validates eagerly (bad input fails when the cache is built, not mid-generate)
and :meth:`H2OBudget.resolve` turns it into counts at prefill.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"H2O {name} must be an int number of tokens, got {value!r}; "
                         f"pass e.g. {name}=64 or use {name}_ratio=0.1")
    if value < 0:
        raise ValueError(f"H2O {name} must be >= 0, got {value}; pass a non-negative token count")


def _check_ratio(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"H2O {name}_ratio must be a number, got {value!r}; pass e.g. {name}_ratio=0.1")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"H2O {name}_ratio must be a finite number >= 0, got {value}; "
                         f"pass a fraction of the prompt length such as 0.1")


@dataclass(frozen=True)
class H2OBudget:
    """Per-layer, per-head KV budget of the H2O policy.

    Args:
        heavy (int, Optional): heavy-hitter slots: the old tokens with the largest accumulated
            attention. Default: None (then ``heavy_ratio`` is required).
        recent (int, Optional): recent-window slots: the newest tokens, always kept.
            Default: None (then ``recent_ratio`` is required).
        heavy_ratio (float, Optional): ``heavy`` as a fraction of the prompt length. Default: None.
        recent_ratio (float, Optional): ``recent`` as a fraction of the prompt length. Default: None.

    Exactly one of ``heavy``/``heavy_ratio`` and one of ``recent``/``recent_ratio`` must be given.
    A ratio resolves to ``ceil(ratio * prompt_length)`` (ceil, so that any positive ratio keeps at
    least one token); the prompt length is the padded length of the first ``update``.
    """

    heavy: int | None = None
    recent: int | None = None
    heavy_ratio: float | None = None
    recent_ratio: float | None = None

    def __post_init__(self) -> None:
        for name, count, ratio in (("heavy", self.heavy, self.heavy_ratio),
                                   ("recent", self.recent, self.recent_ratio)):
            if count is None and ratio is None:
                raise ValueError(f"H2O budget needs {name}= or {name}_ratio=; "
                                 f"pass e.g. {name}=64 or {name}_ratio=0.1")
            if count is not None and ratio is not None:
                raise ValueError(f"H2O budget got both {name}={count} and {name}_ratio={ratio}; "
                                 f"pass only one of them")
            if count is not None:
                _check_count(name, count)
            else:
                _check_ratio(name, ratio)
        given = [v for v in (self.heavy, self.recent, self.heavy_ratio, self.recent_ratio) if v is not None]
        if all(v == 0 for v in given):
            raise ValueError("H2O budget is 0 (heavy + recent keeps no KV entry); "
                             "give heavy/recent (or their ratios) a positive value")

    def resolve(self, prompt_length: int) -> tuple[int, int]:
        """Return ``(heavy, recent)`` token counts for a prompt of ``prompt_length`` tokens."""
        heavy = self.heavy if self.heavy is not None else _ratio_count(self.heavy_ratio, prompt_length)
        recent = self.recent if self.recent is not None else _ratio_count(self.recent_ratio, prompt_length)
        if heavy + recent == 0:
            raise ValueError(f"H2O ratios give an empty budget for a prompt of {prompt_length} tokens; "
                             f"use larger ratios or absolute heavy=/recent= counts")
        return heavy, recent


def _ratio_count(ratio: float, prompt_length: int) -> int:
    # Round first so that 0.3 * 10 = 3.0000000000000004 resolves to 3, not 4.
    return math.ceil(round(ratio * prompt_length, 6))
