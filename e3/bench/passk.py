"""pass@k with the unbiased estimator, per question and averaged per source or level.

For a question sampled n times with c correct, the chance that at least one
of k samples drawn without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)          (Chen et al. 2021, "Codex")

The binomials overflow floats long before n gets large, so the ratio is
computed as the product prod_{i = n-c+1}^{n} (1 - k / i), which is the same
number term by term and never leaves [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with `c` correct out of `n` samples."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}: pass@k needs at least k samples")
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


@dataclass(frozen=True)
class QuestionResult:
    """How one question fared: `correct` of `samples` completions were right."""

    question_id: str
    source: str
    level: int | None
    samples: int
    correct: int


def parse_ks(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; rejects non-integers, values below 1 and repeats."""
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"k list {text!r} must be comma-separated integers") from exc
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"k list {text!r} must hold distinct integers >= 1")
    return sorted(ks)


def _mean_pass(results: Sequence[QuestionResult], ks: Sequence[int]) -> dict[str, float]:
    return {str(k): sum(pass_at_k(r.samples, r.correct, k) for r in results) / len(results) for k in ks}


def summarize(results: Iterable[QuestionResult], ks: Sequence[int]) -> dict:
    """Mean pass@k over all questions, per source and per level (arithmetic levels as "L3").

    Keys of the pass@k maps are str(k), so the result is JSON as it stands.
    """
    results = list(results)
    if not results:
        raise ValueError("no question results to summarize")
    fewest = min(r.samples for r in results)
    if max(ks) > fewest:
        raise ValueError(f"k={max(ks)} needs at least {max(ks)} samples per question; some question has {fewest}")
    by_source: dict[str, list[QuestionResult]] = {}
    by_level: dict[str, list[QuestionResult]] = {}
    for r in results:
        by_source.setdefault(r.source or "unknown", []).append(r)
        if r.level is not None:
            by_level.setdefault(f"L{r.level}", []).append(r)

    def block(group: Sequence[QuestionResult]) -> dict:
        return {"questions": len(group), "pass_at_k": _mean_pass(group, ks)}

    return {
        "ks": list(ks),
        "overall": block(results),
        "by_source": {name: block(group) for name, group in sorted(by_source.items())},
        "by_level": {name: block(group) for name, group in sorted(by_level.items(), key=lambda kv: int(kv[0][1:]))},
    }
