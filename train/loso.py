"""``python -m train.loso``: leave-one-source-out figures, research rather than shipping.

For every source given with ``--data``, a run is trained on that source alone (its own val
selects the epoch and the threshold, as a single-source run does) and then scored on the val
split of every source. ``--weights`` may name a file or run per source with ``{source}`` (the
folder name): the shipped MobileNetV2's head sits on a backbone fine-tuned in a run of its own
(``make train``'s two runs), so its leave-one-source-out figures need a backbone run on each
source alone first, each head then starting from its own source's backbone. The off-diagonal cells are what a hospital whose scanner was never
seen in training should expect; the report (Markdown + one ROC picture) goes to ``--report``
next to the two-source model's figures.

Exit status: 0 written, 2 bad arguments or data.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from device.core.metrics import roc_curve
from train import report
from train.data import DataError
from train.model import WeightsError
from train.recipe import ARCHITECTURES, default_recipe


def _cell(figures: dict) -> str:
    return (f"{figures['auc']:.3f} / {figures['accuracy']:.3f} / {figures['sensitivity']:.3f} / "
            f"{figures['specificity']:.3f}")


def write_report(path: Path, results: dict, commands: list[str], wall: dict, arch: str, command: str) -> None:
    """Markdown table (trained on -> scored on) and ``<stem>.png`` with the ROC curves."""
    names = list(results)
    lines = [
        f"# Leave-one-source-out: {arch}",
        "",
        "Each row is a run trained on one source only (its own val chose the epoch and the threshold); "
        "each column scores that run on a source's val split at the run's threshold. Cells: ROC AUC / "
        "accuracy / sensitivity / specificity. **Off the diagonal** is a source the run never saw: what a "
        "new hospital should expect from a model that was not trained on its scanners.",
        "",
        "| trained on ↓ / scored on → | " + " | ".join(names) + " | wall time |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for trained in names:
        row = [f"**{_cell(results[trained][scored])}**" if scored == trained else _cell(results[trained][scored])
               for scored in names]
        lines.append(f"| {trained} | " + " | ".join(row) + f" | {wall[trained] / 60:.1f} min |")
    lines += ["", f"![ROC per run and source]({path.with_suffix('.png').name})", "", "Made with:", "",
              f"```\n{command}\n```", "", "which ran, per source:", ""]
    lines += [f"- `{c}`" for c in commands]
    path.write_text("\n".join(lines) + "\n")

    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4), squeeze=False)
    for ax, trained in zip(axes[0], names, strict=True):
        for index, scored in enumerate(names):
            figures = results[trained][scored]
            fpr, tpr, _ = roc_curve(figures["y"], figures["scores"])
            style = "-" if scored == trained else "--"
            ax.plot(fpr, tpr, style, drawstyle="steps-post", color=f"C{index}",
                    label=f"{scored}{' (own val)' if scored == trained else ' (unseen)'}: AUC {figures['auc']:.3f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(f"trained on {trained} only", fontsize=10)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(loc="lower right", fontsize=8)
    report.save_figure(fig, path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.loso", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="mobilenetv2")
    parser.add_argument("--data", type=Path, action="append", required=True, help="a source ImageFolder (repeat; at least two)")
    parser.add_argument("--weights", required=True,
                        help="as for python -m train; {source} in it is replaced by each source's folder name")
    parser.add_argument("--out", type=Path, default=Path("runs/loso"), help="folder for the runs (one per source)")
    parser.add_argument("--report", type=Path, default=Path("docs/leave-one-source-out.md"))
    parser.add_argument("--train-args", default="", help="extra python -m train flags, e.g. '--fine-epochs 12'")
    parser.add_argument("--cache", default=".cache/train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args.data) < 2:
        print("train.loso: give at least two --data sources", file=sys.stderr)
        return 2
    from train.cli import main as train_main
    from train.evaluate import score_run

    command = " ".join(shlex.quote(a) for a in ["python", "-m", "train.loso", *(argv if argv is not None else sys.argv[1:])])
    names = [folder.resolve().name for folder in args.data]
    results, commands, wall = {}, [], {}
    try:
        default_recipe(args.arch, args.weights != "none")
        for name, folder in zip(names, args.data, strict=True):
            run = args.out / name
            weights = args.weights.replace("{source}", name)
            train_argv = ["--arch", args.arch, "--data", str(folder), "--weights", weights, "--out", str(run),
                          "--cache", args.cache, "-q", *shlex.split(args.train_args)]
            commands.append("python -m train " + shlex.join(train_argv))
            print(f"== trained on {name} only -> {run}", flush=True)
            started = time.perf_counter()
            if train_main(train_argv) != 0:
                return 2
            wall[name] = json.loads((run / "run.json").read_text())["wall_seconds"] or time.perf_counter() - started
            scored = [f"{other}={other_folder / 'val'}" for other, other_folder in zip(names, args.data, strict=True)]
            metrics, splits, scores = score_run(run, scored, cache_dir=Path(args.cache) if args.cache else None)
            offsets = np.cumsum([0] + [len(split.labels) for _, split in splits])
            results[name] = {}
            positive = json.loads((run / "run.json").read_text())["positive_label"]
            for (other, split), start, end in zip(splits, offsets[:-1], offsets[1:], strict=True):
                figures = dict(metrics["sources"][other])
                figures["y"] = np.array([label == positive for label in split.labels], dtype=int)
                figures["scores"] = scores[start:end]
                results[name][other] = figures
    except (DataError, WeightsError) as error:
        print(f"train.loso: {error}", file=sys.stderr)
        return 2
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.report, results, commands, wall, args.arch, command)
    for trained in names:
        print(f"trained on {trained}: " + ", ".join(f"{scored} AUC {results[trained][scored]['auc']:.3f}" for scored in names))
    print(f"wrote {args.report} and {args.report.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
