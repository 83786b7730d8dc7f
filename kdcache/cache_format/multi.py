"""Several caches read as one (``kdtrain run --cache A.kdc --cache B.kdc``): :class:`MultiCache`
and :func:`open_caches`.

Both :class:`~kdcache.cache_format.reader.KDCache` and :class:`MultiCache` satisfy
:class:`~kdcache.cache_format.reader.CacheReader`, the part of a reader the student's data
pipeline uses. A MultiCache has no ``stream``: ``supports_stream`` is False and the student reads
it with random access.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdcache.cache_format.reader import CacheReader, open_cache


class MultiCache:
    """Several opened caches read as one (``kdtrain run --cache A.kdc --cache B.kdc``): every
    teacher name must be in exactly one of them. Random access only (no ``stream``)."""

    supports_stream = False

    def __init__(self, caches: Sequence[Any]) -> None:
        self.caches = list(caches)
        self.path = " + ".join(str(c.path) for c in self.caches)
        self.teachers: dict[str, Any] = {}
        self.shards: dict[str, Any] = {}
        self._of: dict[str, Any] = {}
        for c in self.caches:
            for name, rec in c.teachers.items():
                if name in self._of:
                    raise ValueError(
                        f"teacher {name!r} is in two caches ({self._of[name].path} and {c.path}); "
                        f"build one of them under another name (kdcache build --name NAME)"
                    )
                self._of[name] = c
                self.teachers[name] = rec
                self.shards[name] = c.shards[name]

    def _cache(self, teacher: str):
        if teacher not in self._of:
            raise KeyError(
                f"teacher {teacher!r} not in caches {self.path} (teachers: {sorted(self.teachers)})"
            )
        return self._of[teacher]

    def utt_ids(self, teacher: str) -> list[str]:
        return self._cache(teacher).utt_ids(teacher)

    def get(self, utt_id: str, teacher: str, *, hidden: bool = True):
        return self._cache(teacher).get(utt_id, teacher, hidden=hidden)

    def chunk_groups(self, teacher: str, **kwargs):
        return self._cache(teacher).chunk_groups(teacher, **kwargs)

    def stream(self, **kwargs):
        raise ValueError("several caches are read with data.reader=random, not stream")


def open_caches(paths: str | Sequence[str]) -> CacheReader:
    """One cache path -> the opened cache; several -> a :class:`MultiCache` over them."""
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        return open_cache(str(paths))
    paths = [str(p) for p in paths]
    if len(paths) == 1:
        return open_cache(paths[0])
    return MultiCache([open_cache(p) for p in paths])
