"""The study verdict: how slice probabilities of one study folder become one label.

Rule (``max``, version 1): the study probability is the **highest** positive-class
probability of its readable slices, and the study is positive iff that reaches the bundle's
own threshold, i.e. iff at least one slice is positive.

Why this rule for triage:

- **It never contradicts the slices.** A reader who opens a positive study finds at least one
  positive slice, and a negative study has none; the threshold keeps the meaning it was
  calibrated for (per slice), with no second threshold to tune.
- **It is monotone as slices arrive.** A study that was flagged stays flagged when more
  (normal) slices come in; a triage queue never silently un-flags a patient. Mean-based rules
  dilute a focal finding as normal slices accumulate.
- **It does not inflate with study size.** Noisy-OR (``1 - prod(1 - p)``) treats slices as
  independent; neighbouring slices are strongly correlated, so a 300-slice study of
  ``p = 0.05`` slices would come out near 1.
- **Uncertain slices ask for a reader.** A slice in the bundle's (or site's) "uncertain —
  review" band (:mod:`device.core.band`) is neither positive nor negative; a study with such a
  slice and no positive one is :data:`~device.core.band.REVIEW`, never negative: the verdict
  cannot clear a study that holds a slice the model could not call.
- **Cost**: one false-positive slice flags the study, so specificity per study is lower than
  per slice. For triage (deciding what a radiologist reads first) a false alarm costs minutes
  and a miss costs much more; ``positive_slices`` is stored next to the verdict so the UI can
  show how many slices carry it.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.core.band import REVIEW

RULE = "max"


@dataclass(frozen=True)
class StudyVerdict:
    probability: float | None  # None while the study has no readable slice
    label: str | None
    slices: int  # readable slices
    positive_slices: int
    top_index: int | None  # which of the given slices carries the verdict
    uncertain_slices: int = 0  # slices labelled uncertain (in the band)


def aggregate(
    probabilities: list[float],
    threshold: float,
    positive_label: str,
    negative_label: str,
    uncertain: list[bool] | None = None,
) -> StudyVerdict:
    """The study verdict from its slices' positive-class probabilities (rule :data:`RULE`).

    ``uncertain`` marks the slices labelled uncertain when they were scored: they are not
    positive whatever their probability, and without a positive slice they make the study
    :data:`~device.core.band.REVIEW`."""
    if not probabilities:
        return StudyVerdict(None, None, 0, 0, None)
    flags = list(uncertain) if uncertain is not None else [False] * len(probabilities)
    top_index = max(range(len(probabilities)), key=probabilities.__getitem__)
    top = float(probabilities[top_index])
    positives = sum(1 for p, flag in zip(probabilities, flags, strict=True) if p >= threshold and not flag)
    undecided = sum(flags)
    label = positive_label if positives else REVIEW if undecided else negative_label
    return StudyVerdict(top, label, len(probabilities), positives, top_index, undecided)
