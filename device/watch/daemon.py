"""``ctpi watch``: the appliance's daemon. Every slice dropped into the inbox is triaged once.

Pipeline (one process, the model loaded once); this module is the loop, its parts live in
:mod:`~device.watch.intake`, :mod:`~device.watch.reader` and :mod:`~device.watch.storage`:

- **intake**: watchdog (inotify) events and a periodic rescan notice files; a file is taken
  only after its size, mtime and inode stayed unchanged for ``settle_seconds`` and only if
  its name is not a temporary one (``.*``, ``*.part``, ``*.tmp``, ``*.crdownload``);
- **reader thread**: reads the bytes, hashes them (sha256), decodes and preprocesses, into a
  bounded queue, so decoding the next slice overlaps inference of this one;
- **main thread** (here): inference, then results are committed to the journal in small groups, then
  the files move to ``STATE/done/`` or ``STATE/rejected/``. The order (commit, move, fsync
  the folders, mark moved) is what makes it exactly-once; see :mod:`device.watch.journal`.

Study heatmaps: when idle, the occlusion map of a study's top slice, one per idle pass, into
the journal for the DICOM node (:mod:`~device.watch.evidence`; ``study_heatmaps``).

Retention: with ``keep_done_days`` set, images in ``STATE/done/`` older than that are deleted
(at start-up and hourly, a bounded batch per loop turn so triage never waits long); the
records stay. See :mod:`device.watch.journal`.

Operations: SIGTERM/SIGINT finish the current slice, commit, and exit 0. A full disk or a
read-only state folder stops intake (files stay in the inbox), is logged once as an error,
and is retried every ``retry_seconds``. ``READY=1`` goes to systemd only once the loop
runs, ``WATCHDOG=1`` from the loop itself (a hung loop gets restarted).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import time
from pathlib import Path

from device import __version__
from device.config import ConfigError, LogFormat, WatchConfig, load_config, override
from device.core.bundle import load_bundle
from device.core.heatmap import DEFAULT_GRID
from device.watch.evidence import StudyHeatmaps
from device.watch.intake import Arrivals, watch_inbox
from device.watch.journal import Journal, JournalError, SliceResult
from device.watch.logs import configure_logging
from device.watch.reader import Decoded, Reader
from device.watch.sdnotify import Notifier
from device.watch.storage import PRUNE_SECONDS, Storage, StorageError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_STORAGE, EXIT_USAGE = 0, 1, 2
TICK_SECONDS = 0.1


def memory_mb() -> tuple[float | None, float | None]:
    """Current and peak RSS of this process (Linux), in MB."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["VmHWM"].split()[0]) / 1024.0
    except (OSError, KeyError, ValueError):
        return None, None


def check_folders(inbox: Path, state: Path) -> None:
    """Refuse a missing inbox, and an inbox and state folder inside one another."""
    if not inbox.is_dir():
        raise ConfigError(f"inbox {inbox} is not a folder; create it or set [watch] inbox / --inbox")
    inbox, state = inbox.resolve(), state.resolve()
    if state.is_relative_to(inbox) or inbox.is_relative_to(state):
        raise ConfigError(f"state folder {state} and inbox {inbox} must not contain one another")


def use_site_profile(classifier, state: Path) -> str | None:
    """Decide with ``STATE/site-profile.json`` (``ctpi site-check --accept``) when it was
    accepted for this model; a profile for another model is refused (logged, shown by
    ``ctpi status`` and the page) and the bundle's own threshold applies. Returns the refusal, or None."""
    from device.core.siteprofile import SiteProfileError, load_site_profile

    try:
        profile = load_site_profile(state)
        classifier.use_site_profile(profile)
    except SiteProfileError as error:
        log.error("%s", error, extra={"event": "site-profile-refused"})
        return str(error)
    if profile is not None:
        log.info("%s (%s)", profile.describe(), profile.path, extra={"event": "site-profile"})
    return None


def triage(item: Decoded, classifier, positive_label: str) -> SliceResult:
    """The result of one read file: the model's answer, or the reason the reader rejected it."""
    result = SliceResult(path=item.path, sha256=item.sha256, size=item.size, status="rejected", seen_at=item.seen_at,
                         movable=item.movable)
    if item.error is not None:
        result.reason, result.message = item.error.reason, str(item.error)
        return result
    prediction = classifier.predict_pixels(item.pixels, item.latency_ms)
    result.status = "ok"
    result.label = prediction.label
    result.positive = prediction.label == positive_label
    result.positive_probability = prediction.positive_probability
    result.probabilities = prediction.probabilities
    result.threshold = prediction.threshold
    result.model_name = classifier.bundle.name
    result.model_sha256 = prediction.model_sha256
    result.format, result.mode = item.format, item.mode
    result.latency_ms = prediction.latency_ms
    result.uncertain_band = prediction.uncertain_band
    result.bundle_sha256 = prediction.bundle_sha256
    return result


def model_status(classifier, site_error: str | None) -> dict:
    """The heartbeat's model: what `ctpi status` and the page show of the bundle in use."""
    return {
        "name": classifier.bundle.name,
        "path": str(classifier.bundle.path),
        "format": classifier.format,
        "sha256": classifier.sha256,
        "threshold": classifier.threshold,
        "uncertain_band": classifier.band.to_manifest() if classifier.band is not None else None,
        "site_profile": classifier.site.describe() if classifier.site is not None else None,
        "site_profile_error": site_error,
        "backend": classifier.backend.name,
        "threads": classifier.threads,
    }


class Daemon(Storage):
    """The watch loop. ``run()`` returns an exit status; see the module docstring."""

    def __init__(self, config: WatchConfig, once: bool = False, notifier: Notifier | None = None, heatmap_grid: int = DEFAULT_GRID):
        """``heatmap_grid``: the study heatmaps' grid (``[ui] heatmap_grid``, see :func:`run`)."""
        from device.core.classifier import Classifier  # the slow import: after config errors are reported

        self.config = config
        self.once = once
        self.heatmaps = StudyHeatmaps(config.study_heatmaps, heatmap_grid if heatmap_grid >= 1 else DEFAULT_GRID)
        self.inbox = Path(config.inbox).absolute()
        self.state = Path(config.state).absolute()
        check_folders(self.inbox, self.state)
        self.notifier = notifier or Notifier()
        bundle = load_bundle(config.model, expected_sha256=config.bundle_sha256 or None)
        self.classifier = Classifier(bundle, config.format, config.threads, None)
        self.site_error = use_site_profile(self.classifier, self.state)
        bundle = self.classifier.bundle
        self.positive_label = bundle.positive_label
        others = [label for label in bundle.labels if label != bundle.positive_label]
        self.negative_label = others[0]
        self.arrivals = Arrivals(self.inbox, config.ignore, config.settle_seconds)
        self.reader = Reader(self.inbox, bundle.spec, config.queue_size, config.max_attempts)
        self.reader.check = self.classifier.check
        self.in_flight: set[str] = set()
        self.signatures: dict[str, tuple | None] = {}
        self.batch: list[SliceResult] = []
        self.batch_started = 0.0
        self.stop_requested = False
        self.blocked: str | None = None
        self.processed = {"ok": 0, "rejected": 0}
        self.started_at = time.time()
        self.journal: Journal | None = None

    # -- signals and heartbeat --------------------------------------------------------------

    def request_stop(self, signum=None, frame=None) -> None:
        if not self.stop_requested:
            log.info("stop requested (signal %s): finishing the current slice", signum, extra={"event": "stopping"})
        self.stop_requested = True

    def heartbeat_data(self, state: str) -> dict:
        rss, peak = memory_mb()
        return {
            "pid": os.getpid(),
            "state": state,
            "message": self.blocked,
            "version": __version__,
            "started_at": self.started_at,
            "inbox": str(self.inbox),
            "model": model_status(self.classifier, self.site_error),
            "queue": self.reader.todo.qsize() + self.reader.done.qsize() + len(self.batch),
            "waiting": len(self.arrivals),
            "processed": dict(self.processed),
            "rss_mb": rss,
            "peak_rss_mb": peak,
            "heartbeat_seconds": self.config.heartbeat_seconds,
            "study_heatmaps": self.config.study_heatmaps,  # the DICOM node waits for them only if so
            "heatmap_grid": self.heatmaps.grid,
        }

    def beat(self, state: str) -> None:
        if self.journal is None:
            return
        try:
            self.journal.beat(self.heartbeat_data(state))
        except JournalError as error:
            if self.blocked is None:
                self.block(str(error))
            else:  # already blocked: the heartbeat goes stale, which `ctpi status` reports
                log.debug("heartbeat not written: %s", error)

    # -- processing -------------------------------------------------------------------------

    def infer(self, item: Decoded) -> SliceResult:
        self.signatures[item.path] = item.signature
        return triage(item, self.classifier, self.positive_label)

    def step(self) -> None:
        """One turn of the loop: feed settled files to the reader, infer what is decoded,
        commit when the group is full, old or the pipeline idle."""
        for relative, seen_at in self.arrivals.due(skip=self.in_flight):
            self.in_flight.add(relative)
            self.reader.todo.put((relative, seen_at))
        deadline = time.monotonic() + TICK_SECONDS
        while not self.stop_requested and self.blocked is None:
            try:
                item = self.reader.done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not self.batch:
                self.batch_started = time.monotonic()
            self.batch.append(self.infer(item))
            if len(self.batch) >= self.config.batch_size:
                self.flush()
            if time.monotonic() >= deadline:
                break
        if self.batch and (self.stop_requested or self.reader.idle() or self.batch_age() >= self.config.batch_seconds):
            self.flush()

    def idle(self) -> bool:
        """Nothing settling in the inbox, being read, scored or waiting to be committed."""
        return not len(self.arrivals) and not self.in_flight and not self.batch and self.reader.idle()

    def study_heatmap(self) -> bool:
        """One due study heatmap when idle (:class:`~device.watch.evidence.StudyHeatmaps`)."""
        try:
            return self.heatmaps.make_one(self.journal, self.classifier, self.state, self.idle(), sum(self.processed.values()))
        except JournalError as error:
            self.block(str(error))
            return False

    def batch_age(self) -> float:
        return time.monotonic() - self.batch_started if self.batch else 0.0

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        observer = None
        try:
            try:
                self.check_storage()
                self.recover()
            except (StorageError, JournalError, OSError) as error:
                log.error("cannot start: %s; no file was taken", error, extra={"event": "storage-error"})
                return EXIT_STORAGE
            self.reader.start()
            if not self.once:
                observer = watch_inbox(self.inbox, self.arrivals)
            self.arrivals.scan()
            model = self.classifier.bundle.describe(self.classifier.format)
            log.info("watching %s with %s; state in %s", self.inbox, model, self.state,
                     extra={"event": "ready", "model_sha256": self.classifier.sha256,
                            "bundle_sha256": self.classifier.bundle_sha256, "bundle": str(self.classifier.bundle.path)})
            self.notifier.ready(status=f"watching {self.inbox}")
            return self.loop()
        finally:
            self.notifier.stopping()
            self.reader.stop.set()
            if self.reader.is_alive():
                self.reader.join(timeout=10)
            if observer is not None:
                observer.stop()
            self.beat("stopped")
            if self.journal is not None:
                self.journal.close()
            if self.reader.claims is not None and not self.reader.is_alive():
                self.reader.claims.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("stopped; %d ok, %d rejected in this run", self.processed["ok"], self.processed["rejected"],
                     extra={"event": "stopped"})

    def loop(self) -> int:
        now = time.monotonic()
        next_beat = next_scan = next_retry = next_prune = now
        next_ping = now
        ping = self.notifier.ping_interval
        while not self.stop_requested:
            now = time.monotonic()
            if ping and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + ping
            if self.blocked is not None:
                if self.once:
                    log.error("stopping: %s", self.blocked)
                    return EXIT_STORAGE
                if now >= next_retry:
                    next_retry = now + self.config.retry_seconds
                    if not self.try_resume():
                        self.beat("blocked")
                time.sleep(TICK_SECONDS)
                continue
            if now >= next_scan and not self.once:
                self.arrivals.scan()
                next_scan = now + self.config.rescan_seconds
            if now >= next_prune:
                try:
                    more = self.prune()
                except JournalError as error:
                    self.block(str(error))
                    continue
                next_prune = now + (0.0 if more else PRUNE_SECONDS)
            if now >= next_beat:
                self.beat("running")
                next_beat = now + self.config.heartbeat_seconds
                try:
                    self.check_free_space()
                except StorageError as error:
                    self.block(str(error))
                    continue
            self.step()
            if self.study_heatmap():
                continue  # arrivals first: the loop looks at the inbox again before the next map
            if self.once and self.idle():
                break
            if not self.in_flight and not self.batch:
                time.sleep(TICK_SECONDS / 2)
        self.flush()
        return EXIT_STORAGE if self.blocked else EXIT_OK


# -- command line -----------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser("watch", help="triage every slice dropped into a folder (the appliance daemon)")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (default: /etc/ctpi/ctpi.toml if it exists)")
    parser.add_argument("--inbox", type=Path, default=None, help="folder slices are dropped into (subfolders are studies)")
    parser.add_argument("--state", type=Path, default=None, help="folder for the journal and processed files")
    parser.add_argument("--model", type=Path, default=None, help="model bundle (default models/mobilenetv2)")
    parser.add_argument("--bundle-sha256", default=None, help="refuse a bundle whose identity is not this (the deploy pins it)")
    parser.add_argument("--format", dest="fmt", default=None, help="model format in the bundle (default: the bundle's default)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: cores, at most 4)")
    parser.add_argument("--settle-seconds", type=float, default=None, help="how long a file must be unchanged before it is read")
    parser.add_argument("--keep-done-days", type=float, default=None,
                        help="delete triaged images from STATE/done after this many days, keeping their results (default 0: keep)")
    parser.add_argument("--log-format", choices=[f.value for f in LogFormat], default=None, help="text (default) or json lines")
    parser.add_argument("--once", action="store_true", help="process what is in the inbox, then exit")


def config_from_args(args, watch: WatchConfig | None = None) -> WatchConfig:
    """``watch`` (the config file's ``[watch]``, read from ``--config`` when not given) with the
    command line's settings on top."""
    config = watch if watch is not None else load_config(args.config).watch
    return override(
        config,
        inbox=args.inbox,
        state=args.state,
        model=args.model,
        bundle_sha256=args.bundle_sha256,
        format=args.fmt,
        threads=args.threads,
        settle_seconds=args.settle_seconds,
        keep_done_days=args.keep_done_days,
        log_format=LogFormat(args.log_format) if args.log_format else None,
    )


def run(args) -> int:
    from device.core.memory import one_malloc_arena

    settings = load_config(args.config)
    config = config_from_args(args, settings.watch)
    configure_logging(config.log_format, getattr(args, "verbose", False))
    one_malloc_arena()  # before LiteRT's and the reader's threads: the study heatmaps' decode costs no peak
    # one resolution for every heatmap of the appliance: the page's
    return Daemon(config, once=args.once, heatmap_grid=settings.ui.heatmap_grid).run()


def main(argv: list[str] | None = None) -> int:
    from device.cli import main as cli_main

    return cli_main(["watch", *(argv or sys.argv[1:])])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
