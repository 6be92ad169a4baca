"""ImageFolder data sets: ``DIR/<label>/<files>``, labels from folder names.

One definition used by ``ctpi evaluate``, training and conversion, so a folder means the same
thing everywhere. Hidden files and temporary copies are skipped; every other file is listed,
even one that will fail to decode, so that a bad file is reported rather than silently dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".txt", ".csv", ".md", ".json")


@dataclass(frozen=True)
class Example:
    path: Path
    label: str


def is_candidate(path: Path) -> bool:
    """Whether a file in a data folder is meant as a slice (not hidden, not a temp copy)."""
    return path.is_file() and not path.name.startswith(".") and not path.name.lower().endswith(IGNORED_SUFFIXES)


def list_labels(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise ValueError(f"{root} has no label subfolders (expected e.g. {root}/COVID and {root}/NonCOVID)")
    return labels


def list_examples(root: Path, labels: list[str] | None = None) -> list[Example]:
    """All slices under ``root/<label>/`` (recursively), sorted for reproducibility.

    With ``labels`` given (a model's labels), a folder the model does not know is an error:
    scoring a model on classes it cannot output would make every figure meaningless.
    """
    root = Path(root)
    found = list_labels(root)
    if labels is not None:
        unknown = sorted(set(found) - set(labels))
        if unknown:
            raise ValueError(f"{root} has folders {unknown} that are not labels of the model ({labels})")
    examples = [
        Example(path, label)
        for label in found
        for path in sorted((root / label).rglob("*"))
        if is_candidate(path)
    ]
    if not examples:
        raise ValueError(f"{root} holds no slices")
    return examples


def fingerprint(examples: list[Example], root: Path) -> str:
    """sha256 over (relative path, label, content sha256) of every example: names the exact
    training data a model saw, so a manifest can say which data it came from."""
    digest = hashlib.sha256()
    root = Path(root)
    for example in sorted(examples, key=lambda e: str(e.path)):
        content = hashlib.sha256(example.path.read_bytes()).hexdigest()
        digest.update(f"{example.path.relative_to(root).as_posix()}\t{example.label}\t{content}\n".encode())
    return digest.hexdigest()


def combined_fingerprint(named: list[tuple[str, str]]) -> str:
    """One fingerprint for the same split of several sources, from (source name, fingerprint)
    pairs in order: the split's own fingerprint for a single source, so one-source runs and
    bundles keep the fingerprints they always had."""
    if len(named) == 1:
        return named[0][1]
    return hashlib.sha256("|".join(f"{name}:{value}" for name, value in named).encode()).hexdigest()
