"""The training recipe: every hyper-parameter of a run in one dataclass, with its reason.

A run records ``asdict(recipe)`` in ``run.json``, so a figure can always be traced back to the
exact knobs that produced it. Defaults depend on the architecture and on whether the backbone
starts from pretrained weights (:func:`default_recipe`); CLI flags override single fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

ARCHITECTURES = ("mobilenetv2", "resnet50")
THRESHOLD_RULES = ("youden", "sensitivity95")
HEADS = ("dense", "experts", "sources")


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (all have defended defaults, see ``default_recipe``)."""

    img_size: int = 224
    """Square model input side. 224 is the resolution the ImageNet weights were trained at;
    the device letterboxes every slice to it."""
    batch_size: int = 32
    head_epochs: int = 6
    """Stage 1: only the new classifier head learns, on a frozen backbone, so the random head
    does not send large gradients into pretrained filters."""
    head_learning_rate: float = 1e-3
    fine_epochs: int = 40
    """Stage 2: the top of the backbone is unfrozen too (at most this many epochs; early
    stopping usually ends it sooner)."""
    fine_learning_rate: float = 3e-4
    """Stage 2 peak learning rate (AdamW), cosine-decayed to zero. Measured on val, MobileNetV2
    from the shared weights: 1e-4 gave AUC 0.847, 3e-4 gave 0.871, 1e-3 diverged (constant
    output). 3e-4 also quantizes better: the shared weights are dequantized int8, so they sit
    on an 8-bit grid, and at 1e-4 many fine-tuning steps stay smaller than one grid step, so
    int8 rounding undoes part of them (int8 agreed with float on 96.6 % of val slices at 1e-4,
    99.2 % at 3e-4)."""
    unfreeze_from: str = "all"
    """First backbone layer trained in stage 2 (Keras layer name); ``all`` unfreezes everything.
    BatchNormalization layers stay frozen and in inference mode in any case. ImageNet features
    fit these figure crops poorly (a head on the frozen backbone reaches val AUC 0.63), so the
    whole backbone adapts: from ``block_11_expand`` on, val AUC was 0.78; with ``all``, 0.85."""
    batchnorm_training: bool = False
    """Whether BatchNorm uses batch statistics while training. False for pretrained weights
    (the shared MobileNetV2 weights have BN folded in, and 425 images would corrupt the
    running statistics); True only for a backbone trained from scratch, which has no
    statistics to protect and needs normalisation to train at all."""
    patience: int = 12
    """Early stopping: epochs without a better val ROC AUC before stage 2 ends."""
    min_epochs: int = 0
    """Stage 2 epochs before early stopping may end it. A network trained from scratch can
    score a lucky val AUC in its first, near-constant epoch; without a floor it would stop
    there (measured: ResNet50 from scratch stopped at epoch 13 with its epoch-1 checkpoint)."""
    dropout: float = 0.3
    label_smoothing: float = 0.05
    """Mild smoothing: the labels are noisy (two NonCOVID training images are COVID figures)."""
    weight_decay: float = 1e-4
    """Decoupled weight decay (AdamW) on the trainable weights."""
    class_weights: bool = True
    """Weight the loss by inverse class frequency. Kept for old run.json files: training now
    draws batches balanced over (source, label) cells, which balances classes without weights."""
    augment: bool = True
    """Train-only augmentation: horizontal flip, rotation, zoom, shift, brightness, contrast."""
    rotation: float = 10.0
    """Maximum rotation in degrees."""
    zoom: float = 0.1
    shift: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.2
    degrade: float = 0.0
    """Probability of each of two image-quality degradations per train slice: a JPEG
    re-encoding at quality 40-95, and a resampling blur (down to 40-100 % of the side and
    back). In COVID-CT's train split every COVID image is a PNG while half the NonCOVID ones
    are JPEGs, and COVID images are smaller (more upsampled, so smoother) than NonCOVID ones;
    compression artefacts and blur predict the label there, and in val (where 32 of 60 COVID
    images are JPEGs) they mislead. Degrading slices of both classes at random takes that
    shortcut away. 0 turns it off."""
    mixup: float = 0.0
    """Mixup's Beta(alpha, alpha) parameter; 0 turns it off. Each train slice is blended with
    another slice of the batch, and so are their one-hot targets: the network cannot memorise
    425 slices one by one and must learn a smoother boundary between the classes."""
    ema_momentum: float = 0.0
    """Exponential moving average of the weights (Keras' optimizer ``use_ema``); 0 turns it
    off. Val scoring, checkpoints and the final model use the averaged weights, which are
    smoother than any single step's and wobble less from one epoch to the next on 118 val
    slices."""
    trunk_views: int = 0
    """Cache the frozen trunk (every backbone layer before ``unfreeze_from``) for this many
    views of each train slice (the first as is, the others augmented), and train only the
    rest of the network on the cached features; 0 trains end to end on augmented pixels.
    Exact, not an approximation, while the trunk is frozen and BatchNorm is in inference
    mode; the price is a fixed set of augmented views instead of fresh ones each epoch. It
    makes ResNet50 trainable on two cores: the trunk's forward pass, most of an epoch's
    cost, runs once per view instead of once per epoch."""
    snap_weights: bool = False
    """Round every convolution kernel onto TFLite's int8 grid (per output channel, BatchNorm
    folded; :mod:`train.snap`) at the start and after every epoch, so the checkpoint that
    ships is a model whose int8 weights are exact: the gate then compares int8 with a float
    model that differs from it only in activation rounding. A projected form of
    quantization-aware training: each epoch's updates accumulate in float and are rounded
    once, and the next epoch adapts to the rounding. Not with ``ema_momentum``. With the
    experts head the frozen backbone is rounded once, before its features are cached."""
    head: str = "dense"
    """``dense``: a softmax layer on the pooled last feature map, trained with the network
    (stages 1 and 2). ``experts``: the backbone stays frozen and a mixture of one linear
    expert per source, weighted by a source gate, is fitted on features pooled at several
    depths (:mod:`train.experts`); ``trunk_views`` views of each train slice are cached.
    ``sources``: one softmax head per source, trained with the network like ``dense``, each
    slice's loss on its own source's head only, so the backbone is not pushed to draw one
    boundary for sources whose every cue but the disease disagrees; checkpoints are chosen on
    each source's val scored by its own head, and the saved model averages the heads. Meant
    as the fine-tuned backbone an experts head (``--weights RUN``) then sits on. With one
    source it is ``dense`` (what ``make loso``'s one-source backbones get)."""
    int8_view: bool = False
    """With ``head = experts``: one more view of every train slice, its features as the full-int8
    model will compute them (the extractor up to the standardised features converted to int8
    and run), so the experts and the gate are fitted on both and learn to lean on what survives
    8-bit activations. A frozen backbone's pooled features move by a fifth to a half of their
    spread between slices under int8 (MobileNetV2), which flips decisions near the threshold."""
    int8_view_samples: int = 0
    """With ``int8_view``: ``N > 0`` calibrates that int8 extractor on the ``N`` train slices
    ``python -m convert --calibration-samples N`` draws (:func:`convert.calibration.draw_by_source`,
    the run's seed), so the view has the shipped model's activation ranges, and convert takes
    that ``N`` by default. Why it matters: a head chosen on one draw's int8 features can flip
    decisions under another's (MobileNetV2 on blocks 6 and 13: 99.1 % of val decisions kept on
    its view's ranges, 97.4 % converted with another 300 slices, 94.5 % with 925). ``0`` (the
    default) keeps the earlier draw, 300 train slices at random from all sources, which both
    shipped heads were fitted with: their recipes reproduce only with it (docs/models.md)."""
    experts_choice: str = "parts"
    """With ``head = experts``: ``parts`` chooses each expert's C and views on its own source's
    val AUC, then the gate's on the mixture's worst-source AUC (with ``int8_view``, each part
    among the candidates whose own decisions survive int8); ``joint`` chooses every part
    together on the mixture's worst-source AUC (with ``int8_view``, among the combinations whose
    mixture keeps its decisions under int8): :func:`train.mixture.fit_mixture`."""
    experts_fixed: str = ""
    """With ``head = experts``: parts whose C and views are given instead of chosen,
    ``SOURCE=CxVIEWS,...,gate=CxVIEWS`` (:func:`train.mixture.parse_fixed`); empty chooses all.
    For refitting a head with another run's choices, e.g. after a change of preprocessing."""
    expert_layers: str = ""
    """Backbone layers (comma-separated) whose pooled maps feed the experts head; empty for
    the architecture's default (the end of each stage, :data:`train.experts.DEFAULT_LAYERS`)."""
    max_minutes: float | None = None
    """Wall-time budget for the whole run: training stops after the epoch that crosses
    ``max_minutes`` minus a margin for evaluation and the report. A run that stops this way
    depends on the machine's speed (the report says so); ``None`` means no budget."""
    threshold_rule: str = "youden"
    """Decision threshold rule on val (``device.core.metrics.choose_threshold``): Youden's J, the
    best balanced accuracy, because val is small and balanced."""

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes) -> Recipe:
        """A copy with the non-``None`` values in ``changes`` applied; unknown names are errors."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def default_recipe(arch: str, pretrained: bool) -> Recipe:
    """The defended defaults for an architecture and a start (pretrained or from scratch).

    Pretrained: head on the frozen backbone, then the top blocks at a low learning rate.
    From scratch there is nothing to protect, so stage 1 is skipped and every layer trains
    from the start at a normal learning rate, with BatchNorm using batch statistics; the
    input is smaller so a ResNet50 fits an hour on two CPU cores.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    if arch == "mobilenetv2":
        recipe = Recipe()
        if not pretrained:
            recipe = replace(
                recipe, head_epochs=0, fine_epochs=60, fine_learning_rate=1e-3, unfreeze_from="all",
                batchnorm_training=True, patience=15,
            )
        return recipe
    # Pretrained ResNet50 (cut after stage 4, see train.model): the last three blocks of
    # stage 4 adapt to CT, the trunk before them is frozen and cached for four views of each
    # slice. Its BatchNorm is real (ImageNet statistics), kept in inference mode.
    recipe = Recipe(unfreeze_from="conv4_block4_1_conv", trunk_views=4, head_epochs=3, fine_epochs=16, patience=6,
                    fine_learning_rate=2e-4, max_minutes=80.0)
    if not pretrained:
        recipe = replace(
            recipe, img_size=128, head_epochs=0, fine_epochs=30, fine_learning_rate=1e-3, unfreeze_from="all",
            batchnorm_training=True, patience=10, min_epochs=20, dropout=0.5, max_minutes=55.0, trunk_views=0,
        )
    return recipe


def refuse_idle_flags(recipe: Recipe, sources: list[str]) -> None:
    """ValueError for a flag that would do nothing with the recipe's head, or an
    ``experts_fixed`` part the run does not have. Why: a run whose command names a knob that
    silently did nothing records a recipe that is not what produced its figures."""
    from train.mixture import parse_fixed

    if recipe.head == "experts":
        ignored = [flag for flag, on in (("--ema", recipe.ema_momentum > 0),
                                         ("--mixup", recipe.mixup > 0), ("--degrade", recipe.degrade > 0)) if on]
        if ignored:
            raise ValueError(f"--head experts keeps the backbone frozen and fits no epochs: {', '.join(ignored)} would do nothing")
        if not recipe.int8_view and recipe.int8_view_samples != Recipe.int8_view_samples:
            raise ValueError("--int8-view-samples sets how the int8 view is calibrated; without --int8-view it would do nothing")
        strangers = sorted(set(parse_fixed(recipe.experts_fixed)) - set(sources) - {"gate"})
        if strangers:
            raise ValueError(f"--experts-fixed names {', '.join(strangers)}: the parts are this run's sources "
                             f"({', '.join(sources)}) and gate")
        return
    if recipe.int8_view or recipe.int8_view_samples != Recipe.int8_view_samples:
        raise ValueError(f"--int8-view is a view for the experts head's fit; with --head {recipe.head} it would do nothing")
    if recipe.experts_choice != "parts":
        raise ValueError(f"--experts-choice is how the experts head's parts are chosen; with --head {recipe.head} it would do nothing")
    if recipe.experts_fixed:
        raise ValueError(f"--experts-fixed gives the experts head's choices; with --head {recipe.head} it would do nothing")
