"""Where the perplexity windows start and which of their tokens are scored.

A window is ``(begin, end, score_from)`` over one document of ``n`` tokens: the model reads tokens
``[begin, end)`` and the negative log-likelihood of tokens ``[score_from, end)`` is counted (token
``t`` is predicted from tokens ``[begin, t)``, so ``score_from >= begin + 1``).

Two protocols (docs/evaluation.md has the formulas):

* **sliding** (Press et al. 2021; the transformers "Perplexity of fixed-length models" guide):
  windows of ``length`` advancing by ``stride``; each window scores only the tokens the previous
  window did not reach, so every token 1..n-1 is scored once (except window-initial tokens when
  ``stride == length``: nothing precedes them inside their window) and, after the first window,
  with at least ``length - stride`` tokens of context.
* **longlora** (LongLoRA ``eval.py``): windows of ``length`` starting at
  ``range(0, n - length, 256)`` with the last start dropped (eval.py calls ``all_ix.pop()``), each
  scoring every predictable token ``begin+1 .. end-1``; windows overlap, so a token is scored up to
  ``length / 256`` times, mostly with short context.
"""
from __future__ import annotations

import math

#: LongLoRA eval.py's ``sliding_window`` (its start spacing).
LONGLORA_STRIDE = 256

Window = tuple[int, int, int]  # (begin, end, score_from)


def sliding_windows(n: int, length: int, stride: int) -> list[Window]:
    """Strided sliding windows over ``n`` tokens, as in the transformers perplexity guide.

    Returns ``1 + ceil((n - length) / stride)`` windows when ``n > length``, one when
    ``2 <= n <= length`` and none when ``n < 2``. The last window may be shorter than ``length``.
    """
    _check(length, stride)
    windows: list[Window] = []
    if n < 2:
        return windows
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def num_sliding_windows(n: int, length: int, stride: int) -> int:
    """Closed form of ``len(sliding_windows(n, length, stride))``."""
    _check(length, stride)
    if n < 2:
        return 0
    return 1 if n <= length else 1 + math.ceil((n - length) / stride)


def longlora_windows(n: int, length: int, stride: int = LONGLORA_STRIDE) -> list[Window]:
    """LongLoRA eval.py windows: starts ``range(0, n - length, stride)`` minus the last one."""
    _check(length, stride)
    starts = list(range(0, n - length, stride))
    if starts:
        starts.pop()  # eval.py drops the final start (all_ix.pop()); kept for exact reproduction
    return [(s, s + length, s + 1) for s in starts]


def num_longlora_windows(n: int, length: int, stride: int = LONGLORA_STRIDE) -> int:
    """Closed form of ``len(longlora_windows(n, length, stride))``: max(0, ceil((n-L)/s) - 1)."""
    _check(length, stride)
    return max(0, math.ceil((n - length) / stride) - 1)


def _check(length: int, stride: int) -> None:
    if length < 2:
        raise ValueError(f"window length must be >= 2 tokens, got {length}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
