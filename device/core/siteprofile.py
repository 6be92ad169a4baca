"""The site profile (``STATE/site-profile.json``): the calibration map, threshold and band a
hospital accepted with ``ctpi site-check --accept`` (:mod:`device.tools.sitecheck`), tied to the
model file's sha256. The classifier decides with it (:meth:`Classifier.use_site_profile`), so the
watch daemon, ``ctpi predict --state`` and the page read it from here; a profile for another model
file is refused with :class:`SiteProfileError`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device.core.band import Band
from device.core.calibration import Calibration

PROFILE_NAME = "site-profile.json"
PROFILE_SCHEMA = "ctpi.site-profile/2"  # 2: the site calibration map
READABLE_SCHEMAS = ("ctpi.site-profile/1", PROFILE_SCHEMA)  # 1: threshold and band on the bundle's scale


class SiteProfileError(ValueError):
    """A site profile that cannot be used (another model's, unreadable); the message says what to do."""


@dataclass(frozen=True)
class SiteProfile:
    """An accepted site profile: the threshold and band the appliance decides with on this site."""

    path: Path
    data: dict

    @property
    def threshold(self) -> float:
        return float(self.data["threshold"])

    @property
    def band(self) -> Band | None:
        return Band.from_manifest(self.data.get("uncertain_band"), self.threshold)

    @property
    def calibration(self) -> Calibration | None:
        """The site's calibration map (None: a schema-1 profile, the bundle's map applies)."""
        entry = self.data.get("calibration")
        return Calibration.from_manifest(entry) if entry else None

    @property
    def model_sha256(self) -> str:
        return self.data["model"]["sha256"]

    def check_model(self, sha256: str) -> None:
        if sha256 != self.model_sha256:
            model = self.data["model"]
            raise SiteProfileError(
                f"the site profile {self.path} was accepted for model {model.get('name')} {model.get('version')} "
                f"({model.get('format')}, sha256 {self.model_sha256[:12]}…), not for this model (sha256 {sha256[:12]}…); "
                "it is not used and the bundle's own threshold applies. Run `ctpi site-check --model BUNDLE DATA "
                "--accept` with the model in use, or delete the file"
            )

    def describe(self) -> str:
        """One line for people: ``site threshold 0.410, checked on 212 local slices on 2026-…;
        site calibration fitted on 212 local slices on 2026-…: ECE 0.160 → 0.031 (cross-fitted)``."""
        line = f"site threshold {self.threshold:.3f}, checked on {self.data['data']['n']} local slices on {self.data['accepted'][:10]}"
        entry = self.data.get("calibration")
        if entry:
            ece = entry["ece"]
            line += (
                f"; site calibration fitted on {entry['fitted_on']['n']} local slices on {self.data['accepted'][:10]}: "
                f"ECE {ece['bundle_map']:.3f} → {_figure(ece['site_map_cross_fitted'], ece['site_map_in_sample'])}"
            )
        return line


def _figure(cross_fitted: float | None, in_sample: float) -> str:
    """The cross-fitted ECE when there is one (the honest figure), else the in-sample one, named."""
    return f"{cross_fitted:.3f} (cross-fitted)" if cross_fitted is not None else f"{in_sample:.3f} (in-sample)"


def load_site_profile(state: str | Path) -> SiteProfile | None:
    """The profile in a state folder, or None when there is none."""
    path = Path(state) / PROFILE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") not in READABLE_SCHEMAS:
            raise ValueError(f"schema {data.get('schema')!r} is not one of {READABLE_SCHEMAS}")
        profile = SiteProfile(path, data)
        float(profile.threshold), profile.model_sha256, profile.band, profile.calibration  # noqa: B018 (validates)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SiteProfileError(f"the site profile {path} cannot be read ({error}); run `ctpi site-check --accept` again") from None
    return profile


def write_site_profile(state: str | Path, data: dict) -> Path:
    """Write ``STATE/site-profile.json`` atomically (readable by the page's service user)."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=state, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, state / PROFILE_NAME)
    return state / PROFILE_NAME
