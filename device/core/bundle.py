"""What a model is: a folder of model files plus ``manifest.json``, verified before use.

The manifest travels with the model and carries everything downstream code needs (labels,
input spec, quantization, preprocessing, threshold, metrics, checksums), so nothing in the
project hard-codes ``224``, a label list or a threshold. :func:`load_bundle` is the only
reader: it checks every file's sha256 and refuses incomplete manifests with a message that
names the file and what to do about it.

The manifest itself decides labels (threshold, labels, input spec, guard, calibration,
uncertain band: whatever it holds), so it is sealed: ``bundle_sha256`` is the sha256 of the
canonical JSON of every other key (:func:`bundle_digest`), written by :func:`write_manifest`
and checked by :func:`load_bundle`. Since ``files`` lists the sha256 of every model file, this
one value names the whole bundle, manifest and files together; it is the identity recorded
with every result, so a changed threshold is a changed identity. A hand edit is refused. The
seal is a digest, not a signature: it stops edits by mistake or by a well-meaning operator;
against someone who can write the release, what protects the Pi is that the deploy pins the
digest in the units' command line (``--bundle-sha256``, root-owned in /etc/systemd/system)
and that releases are root-owned while the services run as ``ctpi``. See README, "Bundle
integrity".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from device.core.preprocess import PreprocessSpec

MANIFEST = "manifest.json"
SCHEMA = "ctpi.bundle/1"
FORMATS = ("int8", "float16", "float32", "onnx")
RUNTIME_OF_FORMAT = {"int8": "tflite", "float16": "tflite", "float32": "tflite", "onnx": "onnx"}
REQUIRED_KEYS = (
    "schema",
    "name",
    "version",
    "architecture",
    "created",
    "labels",
    "positive_label",
    "threshold",
    "preprocessing",
    "input",
    "formats",
    "default_format",
    "files",
    "metrics",
    "training_data",
)
REQUIRED_FORMAT_KEYS = ("file", "runtime", "input", "output")
DIGEST_KEY = "bundle_sha256"  # the seal: sha256 of the canonical manifest without this key


class BundleError(Exception):
    """A model bundle that cannot be used; the message says which file and what to do."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of every key but
    :data:`DIGEST_KEY`: covers whatever the manifest holds, including keys added later."""
    content = {key: value for key, value in manifest.items() if key != DIGEST_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle. ``manifest`` is the parsed file; the attributes are its parts."""

    path: Path
    manifest: dict
    spec: PreprocessSpec

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def positive_label(self) -> str:
        return self.manifest["positive_label"]

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def formats(self) -> dict[str, dict]:
        return self.manifest["formats"]

    @property
    def default_format(self) -> str:
        return self.manifest["default_format"]

    def format_info(self, fmt: str | None = None) -> dict:
        fmt = fmt or self.default_format
        if fmt not in self.formats:
            raise BundleError(
                f"bundle {self.path} has no {fmt!r} model; it has {sorted(self.formats)} "
                f"(choose one of those with --format)"
            )
        return self.formats[fmt]

    def model_path(self, fmt: str | None = None) -> Path:
        return self.path / self.format_info(fmt)["file"]

    def sha256(self, fmt: str | None = None) -> str:
        """The model file's sha256 (what a site profile is accepted for)."""
        return self.manifest["files"][self.format_info(fmt)["file"]]

    @property
    def digest(self) -> str:
        """The bundle's identity: manifest and, through its checksums, every file."""
        return bundle_digest(self.manifest)

    def describe(self, fmt: str | None = None) -> str:
        fmt = fmt or self.default_format
        return f"{self.name} {self.manifest['version']} ({fmt}, sha256 {self.sha256(fmt)[:12]})"


def _fail(path: Path, message: str) -> BundleError:
    return BundleError(f"bundle {path}: {message}")


def _validate(path: Path, manifest: dict) -> None:
    if not isinstance(manifest, dict):
        raise _fail(path, f"{MANIFEST} is not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise _fail(path, f"{MANIFEST} is incomplete, missing {missing}; rebuild it with `python -m convert`")
    if manifest["schema"] != SCHEMA:
        raise _fail(path, f"schema {manifest['schema']!r} is not {SCHEMA!r}; this ctpi cannot read it")
    labels = manifest["labels"]
    if not (isinstance(labels, list) and len(labels) >= 2 and len(set(labels)) == len(labels)):
        raise _fail(path, "labels must be a list of at least two distinct names")
    if manifest["positive_label"] not in labels:
        raise _fail(path, f"positive_label {manifest['positive_label']!r} is not one of the labels {labels}")
    threshold = manifest["threshold"]
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise _fail(path, f"threshold {threshold!r} is not a probability in [0, 1]")
    formats = manifest["formats"]
    if not isinstance(formats, dict) or not formats:
        raise _fail(path, "lists no model formats")
    for fmt, info in formats.items():
        if fmt not in FORMATS:
            raise _fail(path, f"unknown format {fmt!r} (known: {FORMATS})")
        absent = [key for key in REQUIRED_FORMAT_KEYS if key not in info]
        if absent:
            raise _fail(path, f"format {fmt!r} is missing {absent}")
        if info["file"] not in manifest["files"]:
            raise _fail(path, f"format {fmt!r} uses {info['file']} but no sha256 is recorded for it")
    if manifest["default_format"] not in formats:
        raise _fail(path, f"default_format {manifest['default_format']!r} is not among {sorted(formats)}")


def _check_seal(path: Path, manifest: dict, expected_sha256: str | None) -> None:
    recorded = manifest.get(DIGEST_KEY)
    if not isinstance(recorded, str):
        raise _fail(
            path,
            f"{MANIFEST} has no {DIGEST_KEY} seal, so an edit to it could not be told apart from the original; "
            "use a bundle made by this ctpi (`python -m convert`, or the bundle from the release)",
        )
    actual = bundle_digest(manifest)
    if actual != recorded:
        raise _fail(
            path,
            f"{MANIFEST} was edited after the bundle was made (its content hashes to {actual[:16]}…, its seal says "
            f"{recorded[:16]}…); a changed threshold, label or band would change every decision. Copy the bundle "
            "again from its release or re-make it with `python -m convert`; a site's own threshold belongs in the "
            "site profile (`ctpi site-check --accept`), never in the bundle",
        )
    if expected_sha256 and actual != expected_sha256.lower():
        raise _fail(
            path,
            f"is bundle {actual[:16]}…, not {expected_sha256[:16]}… that this service was deployed with "
            "(--bundle-sha256); re-deploy the release (`make deploy`) instead of changing models on the Pi",
        )


def load_bundle(path: str | Path, verify: bool = True, expected_sha256: str | None = None) -> Bundle:
    """Read and verify a bundle folder (or its ``manifest.json``).

    Every file listed in the manifest must exist and match its sha256; an unlisted file in
    the folder is ignored (it can never be loaded as a model, since formats name their files).
    The manifest must match its seal (``bundle_sha256``) and, when ``expected_sha256`` is given
    (the digest a deploy pinned), be exactly that bundle.
    """
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle {path} does not exist (a bundle is a folder such as models/mobilenetv2)")
    if not manifest_path.is_file():
        raise _fail(path, f"no {MANIFEST}: not a ctpi model bundle; bundles are made by `python -m convert`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"{MANIFEST} is not valid JSON ({error}); restore it from the original bundle") from None
    _validate(path, manifest)
    if verify:
        for name, expected in manifest["files"].items():
            file_path = path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise _fail(path, f"file name {name!r} escapes the bundle folder")
            if not file_path.is_file():
                raise _fail(path, f"{name} is listed in {MANIFEST} but missing; copy the whole bundle folder again")
            actual = file_sha256(file_path)
            if actual != expected:
                raise _fail(
                    path,
                    f"{name} has sha256 {actual[:16]}… but {MANIFEST} says {expected[:16]}…: the file was "
                    "changed or corrupted after the bundle was made; copy the bundle again or re-run "
                    "`python -m convert`",
                )
    _check_seal(path, manifest, expected_sha256)
    try:
        spec = PreprocessSpec.from_manifest(manifest["preprocessing"])
    except (TypeError, ValueError) as error:
        raise _fail(path, f"preprocessing: {error}") from None
    return Bundle(path=path, manifest=manifest, spec=spec)


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Complete ``manifest`` with the sha256 of every file in ``folder`` (recursively, except
    the manifest itself) and a creation time if absent, then write it atomically."""
    folder = Path(folder)
    manifest = dict(manifest)
    manifest.setdefault("schema", SCHEMA)
    manifest.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest["files"] = {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")
    }
    manifest.pop(DIGEST_KEY, None)
    _validate(folder, manifest)
    manifest[DIGEST_KEY] = bundle_digest(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile is 0600; a service user must read it too
    os.replace(handle.name, folder / MANIFEST)
    return manifest


def find_bundles(root: str | Path) -> list[Path]:
    """Bundle folders directly under ``root`` (those holding a manifest), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
