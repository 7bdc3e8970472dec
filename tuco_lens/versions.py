"""The library versions tuco_lens is tested with, and the guard for other versions.

tuco_lens's numbers depend on code it does not own: TransformerLens's blocks and KV cache,
and, through ``TransformerBridge``, the Hugging Face ``transformers`` modules. A new release of
either can change them silently (transformers 5.24 did: it renamed the keyword under which
decoder layers pass the KV cache, and cached bridge generation went wrong). So:

* :data:`TESTED` is the range of each dependency that CI installs and tests at both ends
  (``constraints/oldest.txt`` and ``constraints/pinned*.txt``; a test keeps them in step);
* :data:`KNOWN_BROKEN` lists combinations known to give wrong numbers; :func:`check_versions`
  (run by every ``TuCoPair``) refuses them with :class:`~tuco_lens.errors.UnsupportedVersionsError`
  naming the fix, and warns once (:class:`UntestedVersionsWarning`) about versions outside
  :data:`TESTED`. On top of this, cached generation checks at every step that the KV caches
  really grew, so an unknown break of the cache raises instead of generating wrong text.

Example:
    >>> check_versions("TransformerBridge")   # raises or warns only outside the tested set
    >>> installed_versions()
    'torch ..., transformers ..., transformer-lens ...'
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tuco_lens.errors import UnsupportedVersionsError

__all__ = [
    "TESTED",
    "KNOWN_BROKEN",
    "KnownBroken",
    "UntestedVersionsWarning",
    "check_versions",
    "installed_versions",
    "tested_versions",
]

#: ``package: (oldest tested, newest tested)``: the ends CI installs (constraints/oldest.txt,
#: constraints/pinned.txt, constraints/pinned-tl4.txt) and runs the suite on.
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.13.0", "2.13.0"),
    "transformers": ("5.9.0", "5.24.0"),
    "transformer-lens": ("3.9.0", "4.3.0"),
}


class UntestedVersionsWarning(UserWarning):
    """An installed dependency lies outside the versions tuco_lens's CI tests."""


@dataclass(frozen=True)
class KnownBroken:
    """A dependency range known to give wrong results (on one backend, or ``None``: both)."""

    package: str
    versions: str
    backend: str | None
    reason: str
    fix: str


KNOWN_BROKEN: tuple[KnownBroken, ...] = ()

_warned: set[str] = set()


def _version(package: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions() -> str:
    """The installed versions of the dependencies in :data:`TESTED`, as one line.

    Example:
        >>> installed_versions()
        'torch ..., transformers ..., transformer-lens ...'
    """
    return ", ".join(f"{name} {_version(name)}" for name in TESTED)


def tested_versions() -> str:
    """The tested range of each dependency in :data:`TESTED`, as one line.

    Example:
        >>> tested_versions()
        'torch 2.13.0, transformers 5.9.0 to 5.24.0, transformer-lens 3.9.0 to 4.3.0'
    """
    return ", ".join(f"{n} {a}" if a == b else f"{n} {a} to {b}" for n, (a, b) in TESTED.items())


def check_versions(backend: str) -> None:
    """Refuse known-broken dependency versions; warn once about untested ones.

    Args:
        backend: ``"HookedTransformer"`` or ``"TransformerBridge"`` (some breaks hit one only).

    Raises:
        UnsupportedVersionsError: an installed version is in :data:`KNOWN_BROKEN`.
    """
    for broken in KNOWN_BROKEN:
        version = _version(broken.package)
        if broken.backend not in (None, backend) or version is None:
            continue
        if SpecifierSet(broken.versions).contains(version, prereleases=True):
            raise UnsupportedVersionsError(
                f"{broken.package} {version} is known to give wrong results with tuco_lens's "
                f"{backend} backend: {broken.reason} Installed: {installed_versions()}; tested: "
                f"{tested_versions()}. Fix: {broken.fix}"
            )
    outside = []
    for name, (oldest, newest) in TESTED.items():
        version = _version(name)
        if version is not None and not Version(oldest) <= Version(version.base_version) <= Version(newest):
            outside.append(f"{name} {version} (tested: {oldest} to {newest})")
    key = "; ".join(outside)
    if outside and key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"tuco_lens has not been tested with {key}. Its exactness checks still run (cached "
            "generation verifies its KV caches), but other numbers could differ from the tested "
            f"set ({tested_versions()}); to reproduce them, install the pinned versions (README, "
            "'Tested versions').",
            UntestedVersionsWarning,
            stacklevel=3,
        )
