"""Which versions of a model directory a server serves, and which one a request that names none gets.

    latest          the newest version (the default)
    latest:N        the N newest
    specific:3,5    exactly these (those present)
    all             every version in the directory

A version a label names (`contract.labels`) is served whether or not the policy selects it: the label says
that traffic wants it. The default route is `latest` (the newest served), a label, or a number; a share of it
(the canary weight) goes to the `canary` label's version, by the caller's key where it sends one
(`canary_bucket`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

LATEST = "latest"  # the default route's name for the newest served version


@dataclass(frozen=True)
class VersionPolicy:
    """A parsed version policy (module docstring); `select` applies it to the versions present."""

    kind: str  # latest | specific | all
    count: int = 1  # latest:N
    versions: tuple[int, ...] = ()  # specific:...

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `specific:V1,V2` or `all`; ValueError saying what is allowed."""
        kind, _, argument = text.strip().partition(":")
        try:
            if kind == "latest":
                count = int(argument) if argument else 1
                if count >= 1:
                    return cls("latest", count=count)
            elif kind == "specific":
                versions = tuple(sorted({int(part) for part in argument.split(",")}))
                if versions and min(versions) >= 1:
                    return cls("specific", versions=versions)
            elif kind == "all" and not argument:
                return cls("all")
        except ValueError:
            pass
        raise ValueError(f"{text!r} is not a version policy: use latest, latest:N, specific:V1,V2 or all")

    def select(self, present: list[int]) -> list[int]:
        """The versions of `present` (ascending) this policy serves, ascending."""
        if self.kind == "latest":
            return present[-self.count :]
        if self.kind == "specific":
            return [version for version in present if version in self.versions]
        return list(present)


def resolve_default(route: str, served: list[int], labels: dict[str, int]) -> int | None:
    """The version the default route names among `served` (ascending): `latest`, a label, or a number."""
    if not served:
        return None
    if route == LATEST:
        return served[-1]
    version = labels.get(route) if not route.isdecimal() else int(route)
    return version if version in served else None


CANARY_LABEL = "canary"  # the label whose version takes the canary's share of the default route
STABLE_LABEL = "stable"  # the label of the version a candidate is compared with (without it: the default route's)


def canary_bucket(key: str) -> float:
    """Where a caller's key falls in [0, 1): the same key, the same place, on every replica and release.

    A request goes to the canary when its key's bucket is below the canary weight, so raising the weight only
    moves callers from stable to the canary, never back and forth."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
