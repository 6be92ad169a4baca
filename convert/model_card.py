"""``MODEL_CARD.md``: what a bundle is for, what it was measured on, and where it fails.

Rendered from the same dictionaries that go into ``manifest.json`` (run provenance, gate
figures, ``ctpi bench`` output), so the card and the manifest cannot disagree.
"""

from __future__ import annotations

import json

INTENDED_USE = """\
**Decision support for triage, not a diagnostic device.** The model gives each axial lung CT
slice a probability that it shows COVID-19 pneumonia patterns, so that a radiologist can look
at likely-positive studies first. It must not be used to rule COVID-19 in or out, to decide
treatment, or without a clinician reading the images. It was measured only on the public
research data listed below: before go-live a hospital checks it on its own labelled slices
(`ctpi site-check`)."""

SOURCES = {
    "covid-ct": "COVID-CT (Zhao et al., arXiv:2003.13865): figures cut out of papers (COVID) and slices "
                "from other public sources (non-COVID); official patient-disjoint split",
    "sarscov2-ct": "SARS-CoV-2 CT-scan dataset (Soares et al., medRxiv 2020.04.24.20078584): scanner exports "
                   "of real patients of hospitals in São Paulo, non-COVID patients often with other lung "
                   "diseases; split by (pseudo-)patient",
}

FAILURE_MODES = """\
- **Two sources are not every hospital.** Selection used the worst of the sources' val AUC and
  one threshold serves both, but another scanner, window or export path can still shift the
  scores: check on local slices (`ctpi site-check`) before relying on the threshold.
- **Frames, tables, windows.** Both sources come cropped to the body's edges; a scanner or PACS
  export frames the body in air with the table under it. Preprocessing version 2 crops every
  slice to the body first, and version 3 leaves out a table that touches the body too (the
  section on framed slices below measures it; letterboxed whole, such frames put earlier bundles
  at chance on São Paulo's slices). What the crop cannot undo: a patient turned on the table,
  another window, a body cut off by the image's edges.
- **Figure crops.** COVID-CT's COVID slices were cut out of papers, its non-COVID ones come
  from other sources (MedPix, LUNA, Radiopaedia, PMC): a model can learn *where a picture came
  from*. Burnt-in arrows, letters and scale bars are in many of those slices.
- **Shortcuts in the files.** Colour mode, alpha channel and image size correlate with the
  label in both sources. Preprocessing removes mode (one grey channel) but letterboxing keeps
  the aspect ratio visible.
- **Label noise.** COVID-CT was labelled from figure captions (at least two non-COVID training
  slices are COVID figures); the São Paulo patients are grouped into coarse pseudo-patients.
- **Small validation sets.** val has {val_slices} slices; one slice is {val_step:.2f} points of
  accuracy on the pooled set and more on the smaller source. Val chose the epoch and the
  threshold, so its figures are optimistic.
- **Out of scope:** slices that are not axial chest CT are refused by the input guard where it
  recognises them (see its section); what slips through still gets a score. Other pneumonias
  appear only as non-COVID examples, not by design."""


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.2f} MB" if size_bytes >= 100_000 else f"{size_bytes / 1e3:.1f} kB"


def with_marked_section(card: str, start_marker: str, end_marker: str, section: str) -> str:
    """``card`` with the text from ``start_marker`` to ``end_marker`` replaced by ``section``
    (which carries both markers), or ``section`` appended when the card has none: how the steps
    that finish a bundle after its card is written (guard, calibration, framing) keep one copy
    of their section however often they run."""
    start, end = card.find(start_marker), card.find(end_marker)
    if start >= 0 and end > start:
        return card[:start] + section + card[end + len(end_marker) :].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def number_text(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _metrics_table(keras: dict, formats: dict, sizes: dict, split: str) -> list[str]:
    rows = [
        "| model | accuracy | sensitivity | specificity | ROC AUC | agreement with Keras | max \\|Δp\\| | mean \\|Δp\\| | size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ref = keras[split]
    rows.append(
        f"| Keras float (reference) | {number_text(ref['accuracy'])} | {number_text(ref['sensitivity'])} | "
        f"{number_text(ref['specificity'])} | {number_text(ref['auc'])} | — | — | — | — |"
    )
    for fmt, figures in formats.items():
        got = figures[split]
        rows.append(
            f"| {fmt} | {number_text(got['accuracy'])} | {number_text(got['sensitivity'])} | {number_text(got['specificity'])} | "
            f"{number_text(got['auc'])} | {number_text(got['agreement'])} | {number_text(got['max_abs_delta'], 4)} | "
            f"{number_text(got['mean_abs_delta'], 4)} | {_size(sizes[fmt])} |"
        )
    return rows


def _source_lines(training_data: dict) -> list[str]:
    """One line per training source: what it is, its fingerprint and slice counts."""
    sources = training_data.get("sources") or []
    if not sources:
        return []
    lines = [f"**Sources** ({len(sources)}; batches drew every source × label cell equally often):", ""]
    for source in sources:
        counts = source.get("counts", {})
        lines.append(f"- `{source['name']}`: {SOURCES.get(source['name'], 'an ImageFolder of CT slices')}; "
                     f"train {counts.get('train')}, val {counts.get('val')}, train fingerprint `{source['fingerprint'][:16]}…`")
    return [*lines, ""]


def _per_source_tables(keras: dict, formats: dict, split: str) -> list[str]:
    """val figures of every format per source, at the bundle's one threshold."""
    names = list(keras[split].get("sources", {}))
    if len(names) < 2:
        return []
    lines = [f"### {split} per source (one threshold for all)", ""]
    for name in names:
        lines += [
            f"**{name}**",
            "",
            "| model | slices | accuracy | sensitivity | specificity | ROC AUC | agreement with Keras |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, figures in [("Keras float", keras[split]), *[(fmt, f[split]) for fmt, f in formats.items()]]:
            got = figures["sources"][name]
            lines.append(f"| {model} | {got['n']} | {number_text(got['accuracy'])} | {number_text(got['sensitivity'])} | "
                         f"{number_text(got['specificity'])} | {number_text(got['auc'])} | {number_text(got.get('agreement')) if model != 'Keras float' else '—'} |")
        lines.append("")
    return lines


def bench_section(bench: dict) -> list[str]:
    if "error" in bench or not bench.get("results"):
        return [f"Not measured: {bench.get('error', 'no results')}."]
    machine = bench.get("machine", {})
    settings = bench.get("settings", {})
    lines = [
        f"Measured with `ctpi bench` on the conversion machine ({machine.get('cpu', 'unknown CPU')}, "
        f"{machine.get('cores', '?')} cores, {machine.get('system', '')}; {settings.get('runs', '?')} timed runs, "
        f"end-to-end on {settings.get('images', '?')}; 1-minute load average "
        f"{bench.get('load_average_1min', float('nan')):.1f} when it started). A Raspberry Pi is several times "
        "slower; run `make bench` there.",
        "",
        "| format | threads | backend | init ms | invoke ms mean | p50 | p90 | p99 | end-to-end ms mean | slices/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["results"]:
        if "error" in r:
            lines.append(f"| {r.get('format', '?')} | {r.get('threads', '?')} | error: {r['error']} |||||||||")
            continue
        invoke, e2e = r["invoke_ms"], r["end_to_end_ms"]
        lines.append(
            f"| {r['format']} | {r['threads']} | {r['backend']} {r.get('backend_version', '')} | {r['init_ms']:.1f} | "
            f"{invoke['mean']:.2f} | {invoke['p50']:.2f} | {invoke['p90']:.2f} | {invoke['p99']:.2f} | "
            f"{e2e['mean']:.2f} | {r['throughput_per_s']:.1f} | {r['rss_peak_mb']:.0f} |"
        )
    return lines


def _ensemble_lines(ensemble: dict | None) -> list[str]:
    """An ensemble's members (``python -m train.ensemble``): one line each, with its command."""
    if not ensemble:
        return []
    members = ensemble["members"]
    lines = [f"- An **ensemble of {len(members)} runs** in one graph ({ensemble['rule']}); the seed above is the first member's:"]
    for row, command in zip(members, ensemble["commands"], strict=True):
        lines.append(f"  - `{row['run']}`: seed {row['seed']}, val AUC {row['val_auc']:.3f} alone; `{command}`")
    return lines


def _experts_lines(experts: dict | None) -> list[str]:
    """An experts head (``python -m train --head experts``): what it pools, each expert, the gate."""
    if not experts:
        return []
    lines = [f"- Head: **a source gate and one linear expert per source** on the frozen backbone's maps pooled at "
             f"{', '.join(f'`{name}`' for name in experts['layers'])} (`train/experts.py`): P = Σ gate(source) × expert(source)."]
    for name, choice in experts["choices"].items():
        lines.append(f"  - expert `{name}`: C {choice['C']:g}, {choice['views']} view(s) per train slice, "
                     f"val AUC {choice['val_auc']:.3f} on its own source alone")
    gate = experts.get("gate") or {}
    routed = ", ".join(f"{name} {share:.1%}" for name, share in (experts.get("gate_val_accuracy_by_source") or {}).items())
    lines.append(f"  - gate: C {gate.get('C')}, {gate.get('views')} view(s); sends val slices to their own source's expert: "
                 f"{routed}. A slice it sends to the other expert is judged by that source's rule: for a new hospital, the "
                 "source its slices resemble decides which rule applies.")
    cross = experts.get("expert_auc_by_source") or {}
    for name, row in cross.items():
        others = {source: auc for source, auc in row.items() if source != name}
        if others:
            lines.append(f"  - expert `{name}` on the other sources' val: "
                         + ", ".join(f"`{source}` AUC {auc:.3f}" + (" (below chance)" if auc < 0.5 else "")
                                     for source, auc in others.items()))
    return lines


def _initial_weights(weights) -> str:
    if not weights:
        return "not recorded by the training run"
    if isinstance(weights, dict):
        kind = weights.get("kind")
        parts = ["**none: trained from scratch** (no pretrained weights)" if kind == "none" else f"**{kind}**" if kind else ""]
        if weights.get("description"):
            parts.append(weights["description"])
        if weights.get("file"):
            parts.append(f"file `{weights['file']}`")
        if weights.get("sha256"):
            parts.append(f"sha256 `{weights['sha256']}`")
        return "; ".join(p for p in parts if p)
    return str(weights)


def _calibration_line(calibration: dict, has_int8: bool) -> str:
    if has_int8:
        return (
            f"- int8 calibration: {calibration['samples']} training slices drawn stratified by label "
            f"(seed {calibration['seed']}), {calibration['weights']} weights, "
            f"{'with' if calibration.get('bias_correction') else 'without'} bias correction; the other "
            f"{calibration['holdout']} training slices are the second gate split below."
        )
    return (
        f"- No int8 model in this bundle. The second gate split below is the {calibration['holdout']} training "
        f"slices outside the {calibration['samples']} that int8 calibration draws (seed {calibration['seed']})."
    )


def render_model_card(
    *,
    manifest: dict,
    provenance: dict,
    data: dict,
    calibration: dict,
    metrics: dict,
    gate_rules: dict,
    bench: dict,
    sizes: dict,
    command: str,
    note: str | None = None,
) -> str:
    """The card as Markdown. ``manifest`` holds name/version/architecture/labels/threshold/
    training_data; ``data`` the slice counts per split and label that were scored."""
    name, version = manifest["name"], manifest["version"]
    lines = [
        f"# Model card: {name} {version}",
        "",
        f"`{manifest['architecture']}` classifying single lung CT slices into {', '.join(manifest['labels'])}; "
        f"positive label **{manifest['positive_label']}** at threshold **{manifest['threshold']:.4f}** "
        f"(rule: {provenance.get('threshold_rule') or 'not recorded'}, chosen on val by the training run). "
        f"Default format: **{manifest['default_format']}**.",
        "",
        "## Intended use and limits",
        "",
        INTENDED_USE,
        "",
        "## Data and split",
        "",
        f"Trained on **{manifest['training_data'].get('name', 'unknown data')}** (training-data fingerprint "
        f"`{str(manifest['training_data'].get('fingerprint', ''))[:16]}…`, see `manifest.json`) with each data "
        "set's patient-disjoint split: fitted on train, selected (epoch or head, threshold) on val. Test splits and "
        "held-back patients were not used here; they are kept for people who did not tune on them. The val "
        "figures below therefore include model selection on val: they are optimistic.",
        "",
        *_source_lines(manifest["training_data"]),
        "| split | " + " | ".join(manifest["labels"]) + " | total |",
        "|---|" + "---|" * (len(manifest["labels"]) + 1),
    ]
    for split, counts in data.items():
        lines.append(f"| {split} | " + " | ".join(str(counts.get(label, 0)) for label in manifest["labels"]) + f" | {sum(counts.values())} |")
    lines += [
        "",
        f"Input: {manifest['preprocessing']['id']} v{manifest['preprocessing']['version']} "
        f"({manifest['preprocessing']['height']}x{manifest['preprocessing']['width']}x"
        f"{manifest['preprocessing']['channels']} uint8; see `device/core/preprocess.py`).",
        "",
        "## How it was made",
        "",
        f"- Initial weights: {_initial_weights(provenance.get('initial_weights'))}",
        f"- Recipe: `{json.dumps(provenance.get('recipe'), sort_keys=True)}`",
        f"- Seed {provenance.get('seed')}, {(provenance.get('wall_seconds') or 0) / 60:.0f} min of training, "
        f"TensorFlow {provenance.get('tensorflow_version')}, Keras {provenance.get('keras_version')}",
        f"- Trained with: `{provenance.get('command') or 'not recorded'}`",
        *_ensemble_lines(provenance.get("ensemble")),
        *_experts_lines(provenance.get("experts")),
        _calibration_line(calibration, "int8" in manifest["formats"]),
        f"- Converted with: `{command}`",
        "",
        *([f"**Note.** {note}", ""] if note else []),
        "## Accuracy per format",
        "",
        "Every format is scored through `device.core.classifier.Classifier`, the code the Pi runs, with the "
        "bundle's threshold; Δp is the difference in P("
        f"{manifest['positive_label']}) from the Keras float model on the same slice.",
        "",
        "### val (the gated split)",
        "",
        *_metrics_table(metrics["keras"], metrics["formats"], sizes, "val"),
        "",
        *_per_source_tables(metrics["keras"], metrics["formats"], "val"),
        "### train slices not used for calibration",
        "",
        "Seen in training, so accuracy here is not a generalisation figure; it is a larger sample for "
        "the agreement between formats.",
        "",
        *_metrics_table(metrics["keras"], metrics["formats"], sizes, "train_holdout"),
        "",
        "Gate (on val): " + "; ".join(
            f"{fmt} needs agreement ≥ {rule['min_agreement']:.0%} and |ΔAUC| ≤ {rule['max_auc_change']}"
            for fmt, rule in gate_rules.items() if fmt != "split"
        ) + ". All formats in this bundle passed.",
        "",
        "## Speed",
        "",
        *bench_section(bench),
        "",
        "## Files",
        "",
        "| format | file | size | quantization |",
        "|---|---|---|---|",
    ]
    for fmt, info in manifest["formats"].items():
        quantization = info.get("quantization") or "float32"
        if info.get("opset"):
            quantization += f" (ONNX opset {info['opset']})"
        lines.append(f"| {fmt} | `{info['file']}` | {_size(sizes[fmt])} | {quantization} |")
    lines += _fallback_lines(manifest["formats"].get("int8", {}).get("float_fallback"))
    lines += [
        "",
        "sha256 of every file is in `manifest.json`; `ctpi` refuses a bundle whose files do not match.",
        "",
        "## Known failure modes",
        "",
        FAILURE_MODES.format(val_slices=sum(data.get("val", {}).values()) or "few",
                             val_step=100.0 / max(sum(data.get("val", {}).values()), 1)),
        "",
    ]
    return "\n".join(lines)


def _fallback_lines(fallback: dict | None) -> list[str]:
    """How int8's float fallback was chosen (``convert.selective``), trial by trial."""
    if fallback and fallback.get("float_ops") and not fallback.get("trials"):  # picked by name, not by trials
        return ["", f"int8 float fallback: {fallback['float_ops']} of {fallback['quantized_ops']} ops kept in float: "
                    f"{fallback['chosen_on']}; everything before them, the backbone included, is int8."]
    if not fallback or not fallback.get("trials"):
        return []
    trials = ", ".join(
        f"{t['float_ops']} → {t['agreement']:.1%} agreement, |ΔAUC| {t['auc_change']:.4f}" for t in fallback["trials"]
    )
    return [
        "",
        f"int8 float fallback: {fallback['float_ops']} of {fallback['quantized_ops']} ops kept in float, the worst by "
        f"{fallback['ranking']}, chosen on {fallback['trials'][0].get('slices', '?')} {fallback['chosen_on']} "
        f"(ops in float → label agreement with Keras: {trials}).",
    ]
