"""The mixture of the experts head as numbers: a source gate and one linear expert per source,
fitted by logistic regression on cached features and chosen on val, and its prediction.

Why a module of its own: this is the statistics of the head (numpy and scikit-learn, no
TensorFlow), testable on any feature matrix; :mod:`train.experts` turns the backbone into
those features and the fitted numbers into Keras layers.
"""

from __future__ import annotations

import numpy as np

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
GATE_GRID = (0.0001, 0.001, 0.01, 0.1, 1.0)
# With the int8 features of val at hand, a choice (an expert's or the gate's C and views) must
# keep this share of val decisions when its features are the int8 model's: the conversion's
# gate asks 98 %, and what is fitted here is one step short of the converted model.
INT8_AGREEMENT = 0.985


def sample_weights(groups: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Every (group, label) cell weighs the same in total: the balance the batch sampler
    gives the fine-tuned runs, here as loss weights."""
    weights = np.zeros(len(y), dtype=np.float64)
    cells = [(group, label) for group in np.unique(groups) for label in np.unique(y)]
    for group, label in cells:
        members = (groups == group) & (y == label)
        if members.any():
            weights[members] = 1.0 / members.sum()
    return weights * len(y) / weights.sum()


def fit_mixture(train_views: list[np.ndarray], y_train: np.ndarray, s_train: np.ndarray, val: np.ndarray,
                y_val: np.ndarray, s_val: np.ndarray, sources: list[str], c_grid=C_GRID, gate_grid=GATE_GRID,
                val_int8: np.ndarray | None = None, joint: bool = False, fixed: dict | None = None) -> dict:
    """Fit the standardisation, one expert per source and the gate. Each expert's C and views
    are picked on its own source's val AUC; then the gate's C and views on the mixture's
    worst-source val AUC (the run's selection rule). ``train_views[v]`` is view ``v`` of every
    train slice (view 0 as it is), rows aligned with ``y_train`` / ``s_train``; ``y`` is 1
    for positive. ``val_int8``: val's features as the int8 model computes them; then only
    choices whose decisions survive them (:data:`INT8_AGREEMENT`) compete on AUC, and when none
    does, the one that keeps most decisions wins: a float model the int8 gate refuses ships
    nothing.

    ``joint``: the experts and the gate are chosen **together** instead: every combination of
    candidates competes on the mixture's worst-source val AUC (and, with ``val_int8``, on
    whether the mixture keeps INT8_AGREEMENT of val decisions). Why: what the conversion's gate
    judges is the mixture, and a part's own agreement says little of it (a sharp expert's flips
    matter only on slices the gate sends it, a sharp gate's only where the experts disagree);
    part by part, each on its own agreement, the shipped MobileNetV2 settled on the smoothest
    gate. It searches ~2,000 combinations where part by part tries 24 candidates, so its val
    figures are the more optimistic.

    ``fixed``: ``{source or "gate": (C, views)}`` takes those parts' choices as given instead of
    choosing them (:func:`parse_fixed`), so a head is refitted with another run's choices. Why:
    on 118 COVID-CT val slices the choice of C moves the worst source by more than a change of
    preprocessing does, so comparing two preprocessings needs the same choices on both."""
    from sklearn.linear_model import LogisticRegression

    every = np.concatenate(train_views)
    mean, std = every.mean(axis=0), every.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    views = [(view - mean) / std for view in train_views]
    val_z = (val - mean) / std
    int8_z = None if val_int8 is None else (val_int8 - mean) / std
    view_counts = sorted({1, len(views)})
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(sources) - {"gate"}
    if unknown:
        raise ValueError(f"fixed choices for {sorted(unknown)}: not a source of this run ({', '.join(sources)}) or the gate")
    for part, (_, n_views) in fixed.items():
        if not 1 <= n_views <= len(views):
            raise ValueError(f"fixed choice for {part}: {n_views} views, but this run has {len(views)}")

    def grid(part: str, values) -> tuple[list[int], tuple]:
        return ([fixed[part][1]], (fixed[part][0],)) if part in fixed else (view_counts, values)

    candidates = {}  # source -> [(C, views, coef, intercept, own val AUC, own int8 agreement)], simplest first
    for source in sources:
        rows, own = s_train == source, s_val == source
        candidates[source] = []
        counts, cs = grid(source, c_grid)
        for n_views in counts:
            x = np.concatenate([view[rows] for view in views[:n_views]])
            y = np.tile(y_train[rows], n_views)
            for c in cs:
                expert = LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=sample_weights(np.zeros(len(y)), y))
                coef, intercept = expert.coef_[0].copy(), float(expert.intercept_[0])
                auc = _auc(y_val[own], val_z[own] @ coef + intercept)
                agreement = None if int8_z is None else _agreement(
                    y_val[own], s_val[own], _sigmoid(val_z[own] @ coef + intercept), _sigmoid(int8_z[own] @ coef + intercept))
                candidates[source].append((c, n_views, coef, intercept, auc, agreement))
    gates = []  # (C, views, weight, bias), simplest first
    if len(sources) > 1:
        counts, cs = grid("gate", gate_grid)
        for n_views in counts:
            x = np.concatenate(views[:n_views])
            labels = np.tile(np.array([sources.index(name) for name in s_train]), n_views)
            for c in cs:
                gate = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x, labels)
                gates.append((c, n_views, *_softmax_weights(gate, every.shape[1], len(sources))))
    if joint:
        picked, gate_index, worst, agreement = _joint_choice(candidates, gates, sources, y_val, s_val, val_z, int8_z)
    else:  # each expert on its own source (ties: the first, simplest), then the gate for them
        picked = [max(range(len(candidates[s])), key=lambda i, s=s: (_rank(candidates[s][i][4], candidates[s][i][5]), -i))
                  for s in sources]
        gate_index, worst, agreement = _best_gate(candidates, picked, gates, sources, y_val, s_val, val_z, int8_z)
    expert_weight = np.zeros((every.shape[1], len(sources)))
    expert_bias = np.zeros(len(sources))
    choices = {}
    for index, (source, chosen) in enumerate(zip(sources, picked, strict=True)):
        c, n_views, coef, intercept, auc, own_agreement = candidates[source][chosen]
        expert_weight[:, index], expert_bias[index] = coef, intercept
        choices[source] = {"C": c, "views": n_views, "val_auc": round(auc, 4)}
        if own_agreement is not None:
            choices[source]["int8_agreement"] = round(own_agreement, 4)
    gate_weight, gate_bias = np.zeros((every.shape[1], len(sources))), np.zeros(len(sources))
    gate_choice = {"C": None, "views": None, "worst_source_auc": None}
    if gate_index is not None:
        c, n_views, gate_weight, gate_bias = gates[gate_index]
        gate_choice = {"C": c, "views": n_views, "worst_source_auc": round(worst, 4)}
        if agreement is not None:
            gate_choice["int8_agreement"] = round(agreement, 4)
    gate_val = _softmax(val_z @ gate_weight + gate_bias)
    routed = gate_val.argmax(axis=1) == np.array([sources.index(name) for name in s_val])
    accuracy = {name: round(float(routed[s_val == name].mean()), 4) for name in sources if (s_val == name).any()}
    return {"mean": mean, "variance": std**2, "gate": (gate_weight, gate_bias), "experts": (expert_weight, expert_bias),
            "choices": choices, "gate_choice": gate_choice, "gate_val_accuracy": round(float(routed.mean()), 4),
            "gate_val_accuracy_by_source": accuracy, "sources": list(sources),
            "expert_auc_by_source": _cross_auc(val_z @ expert_weight + expert_bias, y_val, s_val, sources)}


def _cross_auc(logits: np.ndarray, y_val: np.ndarray, s_val: np.ndarray, sources: list[str]) -> dict:
    """``{expert: {source: val AUC}}``: every expert on every source's val, its own included.
    Why: a slice the gate sends to another source's expert is ranked by that expert, so what the
    gate's mistakes cost is that expert's AUC on the slice's own source (the shipped MobileNetV2:
    the São Paulo expert ranks COVID-CT val at 0.48, below chance)."""
    table = {}
    for index, expert in enumerate(sources):
        table[expert] = {}
        for source in sources:
            own = s_val == source
            if own.any() and 0 < y_val[own].sum() < own.sum():
                table[expert][source] = round(_auc(y_val[own], logits[own, index]), 4)
    return table


def _mixtures(candidates, picked, gates, sources, z):
    """P(positive) of ``z`` (standardised features) for every gate, with the ``picked`` experts."""
    experts = np.stack([_sigmoid(z @ candidates[s][i][2] + candidates[s][i][3]) for s, i in zip(sources, picked, strict=True)], axis=1)
    if not gates:
        return [experts[:, 0]]
    return [(_softmax(z @ weight + bias) * experts).sum(axis=1) for _, _, weight, bias in gates]


def _best_gate(candidates, picked, gates, sources, y_val, s_val, val_z, int8_z) -> tuple:
    """(gate index, worst-source AUC, int8 agreement or None) of the best gate for the ``picked``
    experts (the first of equals: the simplest). Without gates (one source) the index is None
    and the figures are the lone expert's."""
    floats = _mixtures(candidates, picked, gates, sources, val_z)
    int8s = None if int8_z is None else _mixtures(candidates, picked, gates, sources, int8_z)
    best = None
    for index, mixed in enumerate(floats):
        worst = min(_auc(y_val[s_val == name], mixed[s_val == name]) for name in sources)
        agreement = None if int8s is None else _agreement(y_val, s_val, mixed, int8s[index])
        key = _rank(worst, agreement)
        if best is None or key > best[0]:
            best = (key, index, worst, agreement)
    return (best[1] if gates else None), best[2], best[3]


def _joint_choice(candidates, gates, sources, y_val, s_val, val_z, int8_z) -> tuple:
    """The experts (one candidate index per source) and gate whose mixture ranks first by
    :func:`_rank` of its worst-source val AUC and, with ``int8_z``, its int8 agreement (ties:
    the first met, i.e. the simplest experts, then the simplest gate)."""
    import itertools

    best = None
    for picked in itertools.product(*(range(len(candidates[s])) for s in sources)):
        gate_index, worst, agreement = _best_gate(candidates, picked, gates, sources, y_val, s_val, val_z, int8_z)
        key = _rank(worst, agreement)
        if best is None or key > best[0]:
            best = (key, list(picked), gate_index, worst, agreement)
    return best[1], best[2], best[3], best[4]


def _rank(auc: float, agreement: float | None) -> tuple:
    """Sort key of a candidate: first whether int8 keeps its decisions, then AUC among those
    that do, agreement among those that do not (ties keep the earlier, simpler candidate)."""
    if agreement is None:
        return (True, round(auc, 9))
    passes = agreement >= INT8_AGREEMENT
    return (passes, round(auc if passes else agreement, 9))


def _agreement(y: np.ndarray, sources: np.ndarray, reference: np.ndarray, int8: np.ndarray) -> float:
    """Share of decisions at the run's threshold rule (Youden on the worst source, of the float
    scores) that the int8 scores keep."""
    from device.core.metrics import choose_threshold_by_source

    threshold = choose_threshold_by_source(y, reference, sources, "youden")
    return float(np.mean((reference >= threshold) == (int8 >= threshold)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _auc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if len(y) and 0 < np.mean(y) < 1 else 0.0


def _softmax_weights(gate, width: int, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted sklearn classifier over source indices as softmax weights over all sources."""
    coef, intercept = gate.coef_, gate.intercept_
    if coef.shape[0] == 1:  # sklearn's binary model: one logit for class 1; softmax of (0, z) is the same
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = np.zeros((width, n_sources)), np.zeros(n_sources)
    weight[:, gate.classes_] = coef.T
    bias[gate.classes_] = intercept
    return weight, bias


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_mixture(fitted: dict, features: np.ndarray) -> np.ndarray:
    """P(positive) of joined, unstandardised pooled features, in numpy: what the Keras head
    computes, for checking it and for scoring cached features."""
    z = (features - fitted["mean"]) / np.sqrt(fitted["variance"])
    gate = _softmax(z @ fitted["gate"][0] + fitted["gate"][1])
    return (gate * _sigmoid(z @ fitted["experts"][0] + fitted["experts"][1])).sum(axis=1)


def parse_fixed(text: str) -> dict:
    """``--experts-fixed``: ``"SOURCE=CxVIEWS,...,gate=CxVIEWS"`` (e.g. ``covid-ct=0.001x4,
    sarscov2-ct=0.1x1,gate=0.01x1``, what a run's ``metrics.json`` records under ``experts``)
    as ``{part: (C, views)}``; empty text is no fixed choice."""
    fixed = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        c, _, n_views = value.partition("x")
        try:
            fixed[name.strip()] = (float(c), int(n_views))
        except ValueError:
            raise ValueError(f"--experts-fixed {item!r}: give PART=CxVIEWS, e.g. covid-ct=0.001x4 or gate=0.01x1") from None
        if fixed[name.strip()][0] <= 0:
            raise ValueError(f"--experts-fixed {item!r}: C must be positive")
    return fixed
