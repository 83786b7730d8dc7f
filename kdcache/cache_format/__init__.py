"""The kdcache on-disk format: spec, writer, reader, verify, inspect (docs/format.md).

Importing this package is cheap: zarr and pyarrow load on first use.
"""

from kdcache.cache_format.multi import MultiCache, open_caches
from kdcache.cache_format.reader import CacheReader, KDCache, ShardIndex, open_cache
from kdcache.cache_format.spec import (
    FORMAT_VERSION,
    CacheError,
    TeacherRecord,
    UttTargets,
    content_hash,
    round_mantissa,
)
from kdcache.cache_format.verify import Problem, verify_cache
from kdcache.cache_format.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheReader",
    "CacheWriter",
    "KDCache",
    "MultiCache",
    "Problem",
    "ShardIndex",
    "TeacherRecord",
    "UttTargets",
    "content_hash",
    "open_cache",
    "open_caches",
    "round_mantissa",
    "verify_cache",
]
