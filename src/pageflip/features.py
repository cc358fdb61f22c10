"""Which kernel features work here, checked once: :func:`probe`."""

from __future__ import annotations

import json
import platform
import threading
from collections.abc import Iterator, Mapping

from ._sys.probe import CHECKS, Feature, run_check
from .errors import FeatureUnavailable

__all__ = ["Feature", "ProbeReport", "probe", "require"]


class ProbeReport(Mapping[str, Feature]):
    """Feature name -> :class:`Feature`, in the order pageflip's layers use them."""

    def __init__(self, features: dict[str, Feature]) -> None:
        self._features = features
        self.kernel = platform.release()
        self.machine = platform.machine()

    def __getitem__(self, name: str) -> Feature:
        return self._features[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)

    def missing(self) -> list[Feature]:
        return [f for f in self._features.values() if not f.available]

    def as_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "machine": self.machine,
            "features": {name: f.as_dict() for name, f in self._features.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"), allow_nan=False)


_lock = threading.Lock()
_cache: dict[str, Feature] = {}


def probe(*, refresh: bool = False) -> ProbeReport:
    """Check every kernel feature pageflip uses (once per process) and say why one is missing."""
    with _lock:
        if refresh:
            _cache.clear()
        for name in CHECKS:
            if name not in _cache:
                _cache[name] = run_check(name)
        return ProbeReport(dict(_cache))


def has(name: str) -> bool:
    """Whether feature ``name`` works here; checks only that feature, once."""
    with _lock:
        if name not in _cache:
            _cache[name] = run_check(name)
        return _cache[name].available


def require(name: str) -> None:
    """Raise :class:`FeatureUnavailable` unless feature ``name`` works here."""
    if not has(name):
        feature = _cache[name]
        raise FeatureUnavailable(
            f"{name} is not available here: {feature.detail}", feature=name, reason=feature.detail
        )
