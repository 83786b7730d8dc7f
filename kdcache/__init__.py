"""kdcache: an offline teacher-target cache and a lightweight student trainer for KD into ASR."""

__version__ = "0.1.0"
