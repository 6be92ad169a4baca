"""``python -m train``: fine-tune a backbone on an ImageFolder into a run folder.

Exit status: 0 the run is complete, 2 bad arguments, data or weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from train.data import DataError
from train.model import WeightsError
from train.recipe import ARCHITECTURES, HEADS, THRESHOLD_RULES, default_recipe

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune MobileNetV2 or ResNet50 on CT slices (DATA/train, DATA/val) into RUN_DIR.",
    )
    parser.add_argument("--arch", choices=ARCHITECTURES, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="ImageFolder with train/<label>/ and val/<label>/, named for its source; repeat for several sources")
    parser.add_argument("--weights", required=True,
                        help="imagenet (Keras' own download), none (from scratch), a Keras .weights.h5 file of the backbone, "
                             "or a run folder / its model.keras (that run's fine-tuned backbone)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (RUN_DIR) to write")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--positive-label", default=None, help="positive label (default: COVID)")
    parser.add_argument(
        "--cache", type=lambda value: Path(value) if value else None, default=Path(".cache/train"),
        help="preprocessed-slice cache folder ('' for none)",
    )
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    parser.add_argument("--no-determinism", action="store_true", help="skip tf op determinism (faster on some ops)")
    parser.add_argument("--eager", action="store_true",
                        help="run training and scoring steps eagerly, tracing no graph: for smoke runs on a handful of "
                             "slices, where tracing a backbone's graphs costs more than the steps (slower per step)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    knobs = parser.add_argument_group("recipe (defaults depend on --arch and on pretrained vs from scratch)")
    knobs.add_argument("--img-size", type=int, help="square input side (default 224; 128 for ResNet50 from scratch)")
    knobs.add_argument("--batch-size", type=int)
    knobs.add_argument("--head-epochs", type=int, help="stage 1 epochs, backbone frozen")
    knobs.add_argument("--head-lr", dest="head_learning_rate", type=float)
    knobs.add_argument("--fine-epochs", type=int, help="stage 2 epochs at most, top of the backbone unfrozen")
    knobs.add_argument("--fine-lr", dest="fine_learning_rate", type=float)
    knobs.add_argument("--unfreeze-from", help="first backbone layer trained in stage 2, or 'all'")
    knobs.add_argument("--patience", type=int, help="stage 2 early stopping on val ROC AUC")
    knobs.add_argument("--min-epochs", type=int, help="stage 2 epochs before early stopping may end it")
    knobs.add_argument("--dropout", type=float)
    knobs.add_argument("--label-smoothing", type=float)
    knobs.add_argument("--weight-decay", type=float)
    knobs.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    knobs.add_argument("--rotation", type=float, help="augmentation: maximum rotation in degrees")
    knobs.add_argument("--zoom", type=float, help="augmentation: maximum zoom in or out (fraction)")
    knobs.add_argument("--shift", type=float, help="augmentation: maximum shift (fraction of the side)")
    knobs.add_argument("--brightness", type=float, help="augmentation: maximum brightness change (fraction)")
    knobs.add_argument("--contrast", type=float, help="augmentation: maximum contrast change (fraction)")
    knobs.add_argument("--degrade", type=float, help="probability of a JPEG re-encoding and of a resampling blur per train slice (0 = off)")
    knobs.add_argument("--mixup", type=float, help="mixup Beta(alpha, alpha) parameter (0 = off)")
    knobs.add_argument("--ema", dest="ema_momentum", type=float, help="weight moving-average momentum, e.g. 0.99 (0 = off)")
    knobs.add_argument("--no-class-weights", dest="class_weights", action="store_false", default=None)
    knobs.add_argument("--threshold-rule", choices=THRESHOLD_RULES)
    knobs.add_argument("--trunk-views", type=int,
                       help="cache the frozen trunk for this many views per train slice and train the rest on them (0 = end to end)")
    knobs.add_argument("--snap-weights", action="store_true", default=None,
                       help="keep convolution kernels on the int8 grid: rounded at the start and after every epoch")
    knobs.add_argument("--head", choices=HEADS,
                       help="dense (fine-tuned softmax head), experts (frozen backbone, per-source experts and a source gate) "
                            "or sources (fine-tuned, one softmax head per source: a backbone for experts)")
    knobs.add_argument("--int8-view", action="store_true", default=None,
                       help="--head experts: also fit on every train slice's features as the full-int8 model computes them")
    knobs.add_argument("--int8-view-samples", type=int,
                       help="--int8-view: calibrate the int8 extractor on the N train slices python -m convert "
                            "--calibration-samples N draws (convert then defaults to N); 0 (default): 300 at random, "
                            "the shipped heads' draw")
    knobs.add_argument("--experts-choice", choices=("parts", "joint"),
                       help="--head experts: choose each expert and then the gate (parts), or all together on the mixture (joint)")
    knobs.add_argument("--experts-fixed",
                       help="--head experts: take these parts' C and views instead of choosing them, "
                            "SOURCE=CxVIEWS,...,gate=CxVIEWS (another run's metrics.json, under experts)")
    knobs.add_argument("--expert-layers", help="comma-separated backbone layers pooled for --head experts (default: end of each stage)")
    knobs.add_argument("--max-minutes", type=float, help="wall-time budget; training stops after the epoch that crosses it")
    return parser


RECIPE_FLAGS = (
    "img_size", "batch_size", "head_epochs", "head_learning_rate", "fine_epochs", "fine_learning_rate",
    "unfreeze_from", "patience", "min_epochs", "dropout", "label_smoothing", "weight_decay", "augment", "class_weights",
    "threshold_rule", "max_minutes", "rotation", "zoom", "shift", "brightness", "contrast", "mixup", "ema_momentum", "degrade",
    "trunk_views", "snap_weights", "head", "expert_layers", "int8_view", "int8_view_samples", "experts_choice", "experts_fixed",
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.model import resolve_weights
    from train.run import RunConfig, train_run

    started = time.perf_counter()
    try:
        initial, _ = resolve_weights(args.weights)
        recipe = default_recipe(args.arch, initial.pretrained).override(**{k: getattr(args, k) for k in RECIPE_FLAGS})
        command = " ".join(["python -m train", *(argv if argv is not None else sys.argv[1:])])
        config = RunConfig(
            arch=args.arch, data=args.data, weights=args.weights, out=args.out, recipe=recipe, seed=args.seed,
            positive_label=args.positive_label, cache_dir=args.cache, threads=args.threads,
            deterministic=not args.no_determinism, show_progress=not args.quiet, command=command, eager=args.eager,
        )
        run = train_run(config)
    except (DataError, WeightsError) as error:
        print(f"train: {error}", file=sys.stderr)
        return 2
    val = run["metrics"]["val"]
    print(
        f"{args.out}: val accuracy {val['accuracy']:.3f}, sensitivity {val['sensitivity']:.3f}, "
        f"specificity {val['specificity']:.3f}, AUC {val['auc']:.3f}, ECE {val['ece']:.3f}, "
        f"threshold {run['threshold']:.4f} ({run['threshold_rule']})"
    )
    if len(val.get("sources", {})) > 1:
        for name, figures in val["sources"].items():
            print(f"  {name}: accuracy {figures['accuracy']:.3f}, sensitivity {figures['sensitivity']:.3f}, "
                  f"specificity {figures['specificity']:.3f}, AUC {figures['auc']:.3f}, ECE {figures['ece']:.3f}")
    print(f"wall time {time.perf_counter() - started:.0f} s ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0
