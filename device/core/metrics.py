"""Binary classification metrics: the one implementation that training, conversion gates and
``ctpi evaluate`` share. numpy only, so a Pi can score a bundle without scikit-learn.

Convention: ``y_true`` is 1 for the positive label (e.g. COVID), ``scores`` is the
positive-class probability, and a slice is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import numpy as np

THRESHOLD_RULES = ("youden", "sensitivity95")


def _arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count one half).
    NaN when only one class is present: an AUC is undefined there, not 0.5."""
    y, s = _arrays(y_true, scores)
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    # average ranks over tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for start, end in zip(starts, ends, strict=False):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    rank_sum = ranks[y == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates at each distinct score used as threshold (descending),
    starting from the point (0, 0) at threshold +inf."""
    y, s = _arrays(y_true, scores)
    thresholds = np.unique(s)[::-1]
    positives, negatives = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tpr = [0.0] + [float(((s >= t) & (y == 1)).sum()) / positives for t in thresholds]
    fpr = [0.0] + [float(((s >= t) & (y == 0)).sum()) / negatives for t in thresholds]
    return np.array(fpr), np.array(tpr), np.concatenate(([np.inf], thresholds))


def confusion(y_true, scores, threshold: float) -> dict[str, int]:
    y, s = _arrays(y_true, scores)
    predicted = s >= threshold
    return {
        "tp": int((predicted & (y == 1)).sum()),
        "fn": int((~predicted & (y == 1)).sum()),
        "fp": int((predicted & (y == 0)).sum()),
        "tn": int((~predicted & (y == 0)).sum()),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def binary_metrics(y_true, scores, threshold: float) -> dict:
    """The figures ``ctpi evaluate --json`` prints, in this order and with these keys."""
    counts = confusion(y_true, scores, threshold)
    tp, fn, fp, tn = counts["tp"], counts["fn"], counts["fp"], counts["tn"]
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": tp + fn + fp + tn,
        "accuracy": _ratio(tp + tn, tp + fn + fp + tn),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "auc": roc_auc(y_true, scores),
        "confusion": counts,
        "threshold": float(threshold),
    }


def expected_calibration_error(y_true, scores, bins: int = 10) -> float:
    """ECE over equal-width bins of the positive-class probability (|accuracy - confidence|
    weighted by bin size), the usual reliability-diagram summary."""
    y, s = _arrays(y_true, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(s, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(y[members].mean() - s[members].mean())
    return float(error)


def reliability_bins(y_true, scores, bins: int = 10) -> list[dict]:
    """Per-bin mean predicted probability, observed positive rate and count (for plots)."""
    y, s = _arrays(y_true, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(s, edges[1:-1], right=True), 0, bins - 1)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "count": int((index == b).sum()),
            "mean_probability": float(s[index == b].mean()) if (index == b).any() else float("nan"),
            "observed_rate": float(y[index == b].mean()) if (index == b).any() else float("nan"),
        }
        for b in range(bins)
    ]


def choose_threshold(y_true, scores, rule: str = "youden", min_sensitivity: float = 0.95) -> float:
    """A decision threshold from validation scores.

    ``youden`` maximises sensitivity + specificity - 1 (Youden's J): the point on the ROC curve
    farthest above chance, i.e. the best balanced accuracy; it is the default because the
    validation set is small and balanced, and a rule that chases a sensitivity floor rests on
    the 3 or 4 hardest positives. Among points of equal J it takes the most sensitive one
    (the lowest threshold): for triage a missed case costs more than a second look.
    ``sensitivity95`` takes the highest specificity whose
    sensitivity is at least ``min_sensitivity``, for sites that prefer fewer missed cases.

    The threshold returned lies halfway between the score that defines the chosen ROC point
    and the next lower score, so the validation confusion matrix is reproduced exactly while
    leaving a margin on both sides instead of sitting on one slice's score.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    y, s = _arrays(y_true, scores)
    if y.min() == y.max():
        raise ValueError("threshold selection needs both classes in the validation data")
    fpr, tpr, thresholds = roc_curve(y, s)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the +inf point
    if rule == "youden":
        youden = np.round(tpr - fpr, 12)  # equal J must compare equal despite float rounding
        best = int(np.flatnonzero(youden == youden.max())[-1])  # ties: the most sensitive point
    else:
        eligible = np.flatnonzero(tpr >= min_sensitivity)
        best = int(eligible[np.argmin(fpr[eligible])])
    chosen = thresholds[best]
    lower = s[s < chosen]
    return float((chosen + lower.max()) / 2.0) if lower.size else float(chosen)


# Several sources (hospitals, data sets) scored together: a model good on one and poor on
# another is a poor model, so selection and the threshold look at the worst source, and every
# figure is given per source as well as pooled.


def worst_source_auc(y_true, scores, sources) -> float:
    """The lowest per-source ROC AUC (NaN if a source lacks a class): what selection maximises."""
    y, s = _arrays(y_true, scores)
    groups = np.asarray(sources)
    values = [roc_auc(y[groups == name], s[groups == name]) for name in _names(groups)]
    return float(min(values)) if values else float("nan")


def _names(groups: np.ndarray) -> list:
    """Source names in first-appearance order (the order the data folders were given)."""
    _, first = np.unique(groups, return_index=True)
    return [str(groups[i]) for i in sorted(first)]


def source_metrics(y_true, scores, sources, threshold: float) -> dict:
    """Pooled :func:`binary_metrics` (today's top-level keys, plus ``ece``) with the same
    figures per source under ``"sources"`` (name -> metrics, in data-folder order) and the
    worst source's AUC under ``"worst_source_auc"``. One source gives the same top level."""
    y, s = _arrays(y_true, scores)
    groups = np.asarray(sources)
    if groups.shape != y.shape:
        raise ValueError(f"{y.size} labels but {groups.size} source names")
    pooled = binary_metrics(y, s, threshold)
    pooled["ece"] = expected_calibration_error(y, s)
    per_source = {}
    for name in _names(groups):
        member = groups == name
        figures = binary_metrics(y[member], s[member], threshold)
        figures["ece"] = expected_calibration_error(y[member], s[member])
        per_source[str(name)] = figures
    pooled["sources"] = per_source
    pooled["worst_source_auc"] = float(min(f["auc"] for f in per_source.values())) if per_source else float("nan")
    return pooled


def choose_threshold_by_source(y_true, scores, sources, rule: str = "youden", min_sensitivity: float = 0.95) -> float:
    """One threshold that serves every source, chosen on the worst one.

    ``youden``: the threshold maximising the smallest per-source Youden's J (ties: the larger
    pooled J, then the most sensitive, i.e. lowest, threshold). ``sensitivity95``: among
    thresholds where every source keeps sensitivity >= ``min_sensitivity``, the one with the
    best worst-source specificity. A single source gives exactly :func:`choose_threshold`.
    Like it, the threshold lies halfway between two adjacent pooled scores."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    y, s = _arrays(y_true, scores)
    groups = np.asarray(sources)
    names = _names(groups)
    if len(names) <= 1:
        return choose_threshold(y, s, rule, min_sensitivity)
    for name in names:
        member = groups == name
        if y[member].min() == y[member].max():
            raise ValueError(f"threshold selection needs both classes in every source; '{name}' has one")
    unique = np.unique(s)
    candidates = np.concatenate([[unique[0]], (unique[1:] + unique[:-1]) / 2.0, [np.nextafter(unique[-1], np.inf)]])
    predicted = s[None, :] >= candidates[:, None]  # candidates x slices
    tpr = np.stack([predicted[:, (groups == n) & (y == 1)].mean(axis=1) for n in names], axis=1)
    tnr = np.stack([(~predicted[:, (groups == n) & (y == 0)]).mean(axis=1) for n in names], axis=1)
    pooled_j = predicted[:, y == 1].mean(axis=1) + (~predicted[:, y == 0]).mean(axis=1) - 1.0
    if rule == "youden":
        primary = np.round((tpr + tnr - 1.0).min(axis=1), 12)
    else:
        primary = np.where(tpr.min(axis=1) >= min_sensitivity, np.round(tnr.min(axis=1), 12), -np.inf)
    # lexsort: last key is primary; candidates ascend, so among ties the first is the lowest threshold
    order = np.lexsort((np.arange(len(candidates)), -np.round(pooled_j, 12), -primary))
    return float(candidates[order[0]])


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (95 % by default): unlike the normal
    approximation it stays inside [0, 1] and is sound for the small counts a site check has.
    ``(nan, nan)`` when there are no trials."""
    if trials <= 0:
        return float("nan"), float("nan")
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def roc_auc_interval(y_true, scores, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % confidence interval of the ROC AUC by DeLong's method (the AUC's variance from the
    placement values of each class; DeLong, DeLong and Clarke-Pearson 1988), clipped to
    [0, 1]. ``(nan, nan)`` with fewer than two slices of a class."""
    y, s = _arrays(y_true, scores)
    positives, negatives = s[y == 1], s[y == 0]
    m, n = len(positives), len(negatives)
    if m < 2 or n < 2:
        return float("nan"), float("nan")
    # placement of each positive: share of negatives it beats (ties one half), and vice versa
    order = np.sort(negatives)
    v10 = (np.searchsorted(order, positives, "left") + np.searchsorted(order, positives, "right")) / (2.0 * n)
    order = np.sort(positives)
    v01 = 1.0 - (np.searchsorted(order, negatives, "left") + np.searchsorted(order, negatives, "right")) / (2.0 * m)
    auc = float(v10.mean())
    variance = v10.var(ddof=1) / m + v01.var(ddof=1) / n
    half = z * float(np.sqrt(variance))
    return max(0.0, auc - half), min(1.0, auc + half)
