"""Agreement between evaluators, and consensus labels. Torch-free; pure functions with hand-worked tests.

Every function takes reliability data as rows of units (pairs), one value per evaluator (labeler, annotator or
judge), `None` where that evaluator did not rate the unit.

- `pairwise_agreement`: share of units where two evaluators make the same hard choice, per pair of evaluators
  and the mean over pairs.
- `fleiss_kappa`: Fleiss' kappa from a units x categories table of counts (every unit rated by the same number
  of raters), as in Fleiss (1971).
- `krippendorff_alpha`: Krippendorff's alpha, nominal (categories) or interval (numbers, e.g. soft labels),
  with missing values (Krippendorff 2011, "Computing Krippendorff's alpha-reliability").
- `dawid_skene`: Dawid & Skene (1979) for two classes: EM over each evaluator's sensitivity and specificity, so
  an evaluator who is reliably wrong still carries information and one who is at chance carries none.
- `weighted_mean`: a consensus soft label from several soft labels and weights.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations


def hard_choice(p: float | None, eps: float = 1e-9) -> int | None:
    """A soft label P(answer A is better) as a hard choice: 1 (A), 0 (B), or None for a tie (exactly 0.5)."""
    if p is None or abs(p - 0.5) <= eps:
        return None
    return int(p > 0.5)


def pairwise_agreement(rows: list[list], names: list[str] | None = None) -> dict:
    """Per pair of evaluators (columns): the share of units both rated (not None) with the same value, and on how
    many units; `mean`: the mean share over the pairs that share at least one unit (None when none do)."""
    k = max((len(r) for r in rows), default=0)
    names = names or [str(i) for i in range(k)]
    pairs = {}
    for i, j in combinations(range(k), 2):
        both = [(r[i], r[j]) for r in rows if i < len(r) and j < len(r) and r[i] is not None and r[j] is not None]
        pairs[f"{names[i]}|{names[j]}"] = {"agreement": sum(a == b for a, b in both) / len(both) if both else None,
                                           "units": len(both)}
    shares = [p["agreement"] for p in pairs.values() if p["agreement"] is not None]
    return {"mean": sum(shares) / len(shares) if shares else None, "pairs": pairs}


def fleiss_kappa(counts: list[list[int]]) -> float | None:
    """Fleiss' kappa: counts[i][j] = raters who put unit i in category j; every unit needs the same number n >= 2
    of ratings. kappa = (P_bar - P_e) / (1 - P_e); None when P_e = 1 (every rating in one category)."""
    if not counts:
        return None
    n = sum(counts[0])
    if n < 2 or any(sum(row) != n for row in counts):
        raise ValueError("fleiss_kappa: every unit needs the same number (>= 2) of ratings")
    units = len(counts)
    p_j = [sum(row[j] for row in counts) / (units * n) for j in range(len(counts[0]))]
    p_i = [(sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts]
    p_bar = sum(p_i) / units
    p_e = sum(p * p for p in p_j)
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def category_counts(rows: list[list], categories: list) -> list[list[int]]:
    """Units x categories counts for `fleiss_kappa`, from units x raters values (units with a None left out)."""
    return [[sum(v == c for v in r) for c in categories] for r in rows if r and all(v is not None for v in r)]


def krippendorff_alpha(rows: list[list], level: str = "nominal") -> float | None:
    """Krippendorff's alpha = 1 - D_o / D_e over the pairable values (units with at least two values).

    nominal: delta(c, k) = [c != k]; interval: delta(c, k) = (c - k)^2. Observed disagreement sums each unit's
    ordered value pairs weighted 1/(m_u - 1); expected disagreement pairs every value with every other one.
    None when fewer than two pairable values or no variation at all (D_e = 0)."""
    if level not in ("nominal", "interval"):
        raise ValueError(f"krippendorff_alpha: level={level!r}: expected nominal or interval")
    units = [[v for v in r if v is not None] for r in rows]
    units = [u for u in units if len(u) >= 2]
    n = sum(len(u) for u in units)
    if n < 2:
        return None

    def disagreement(values: list) -> float:  # sum of delta over ordered pairs of distinct positions
        if level == "nominal":
            m = len(values)
            return m * m - sum(c * c for c in Counter(values).values())
        s, s2 = sum(values), sum(v * v for v in values)
        return 2 * len(values) * s2 - 2 * s * s

    d_o = sum(disagreement(u) / (len(u) - 1) for u in units) / n
    d_e = disagreement([v for u in units for v in u]) / (n * (n - 1))
    if d_e <= 1e-15:
        return None
    return 1 - d_o / d_e


def agreement_report(rows: list[list[float | None]], names: list[str]) -> dict:
    """What the diagnostics print for soft labels (units x evaluators): pairwise agreement on hard choices
    (ties left out), Fleiss' kappa on the hard choices of the units every evaluator decided, Krippendorff's alpha
    nominal on the hard choices and interval on the soft labels."""
    hard = [[hard_choice(v) for v in r] for r in rows]
    counts = category_counts(hard, [0, 1])
    return {"evaluators": names, "units": len(rows),
            "pairwise_agreement": pairwise_agreement(hard, names),
            "fleiss_kappa": fleiss_kappa(counts) if counts and len(names) >= 2 else None,
            "fleiss_units": len(counts),
            "alpha_nominal": krippendorff_alpha(hard, "nominal"),
            "alpha_interval": krippendorff_alpha(rows, "interval")}


def weighted_mean(values: list[float], weights: list[float]) -> float:
    """sum(w v) / sum(w); the plain mean when every weight is 0."""
    total = sum(weights)
    if total <= 0:
        return sum(values) / len(values)
    return sum(w * v for w, v in zip(weights, values)) / total


def accuracy_weight(correct: float, total: int) -> float:
    """A labeler's weight from its accuracy on clear pairs: the log-odds of its smoothed accuracy
    (correct + 1) / (total + 2), 0 at or below chance. Log-odds is the weight an independent classifier's vote
    gets in the Bayes-optimal combination; the smoothing keeps a perfect score on a few pairs finite."""
    acc = (correct + 1) / (total + 2)
    return max(0.0, math.log(acc / (1 - acc)))


def dawid_skene(labels: list[dict[str, int]], iters: int = 200, tol: float = 1e-8,
                smoothing: float = 0.01) -> dict:
    """Two-class Dawid-Skene EM. labels[u] = {evaluator: 0 | 1} for unit u.

    Starts from the majority vote (ties at 0.5), then alternates: M-step, each evaluator's sensitivity
    P(says 1 | truth 1) and specificity P(says 0 | truth 0) from the current posteriors (with `smoothing`
    pseudo-counts), and the prior P(truth 1); E-step, each unit's posterior P(truth 1) from the prior and every
    evaluator's likelihood. Returns the posteriors, the per-evaluator estimates (sensitivity, specificity,
    accuracy = their prior-weighted mean), the prior and the iterations run."""
    names = sorted({a for u in labels for a in u})
    post = [sum(u.values()) / len(u) if u else 0.5 for u in labels]
    sens = spec = {}
    prior = 0.5
    it = 0
    while it < iters:
        it += 1
        prior = min(max(sum(post) / max(len(post), 1), 1e-6), 1 - 1e-6)
        sens, spec = {}, {}
        for a in names:
            t1 = y1t1 = t0 = y0t0 = 0.0
            for u, t in zip(labels, post):
                if a in u:
                    t1 += t
                    t0 += 1 - t
                    y1t1 += t * u[a]
                    y0t0 += (1 - t) * (1 - u[a])
            sens[a] = (y1t1 + smoothing) / (t1 + 2 * smoothing)
            spec[a] = (y0t0 + smoothing) / (t0 + 2 * smoothing)
        new = []
        for u in labels:
            logit = math.log(prior / (1 - prior))
            for a, y in u.items():
                logit += math.log(sens[a] / (1 - spec[a])) if y == 1 else math.log((1 - sens[a]) / spec[a])
            new.append(1 / (1 + math.exp(-max(min(logit, 700), -700))))
        delta = max((abs(x - y) for x, y in zip(new, post)), default=0.0)
        post = new
        if delta < tol:
            break
    return {"posterior": post, "prior": prior, "iterations": it,
            "evaluators": {a: {"sensitivity": sens[a], "specificity": spec[a],
                               "accuracy": prior * sens[a] + (1 - prior) * spec[a]} for a in names}}
