"""Streaming keystroke shards into subject-aware training batches and evaluation batches.

Training: :class:`SubjectBatchLoader` (P subjects × K sessions per rank, disjoint subjects across
ranks, equal batch counts, resumable). Evaluation: :class:`SessionLoader` (every session once).
Both read shards only through the manifest and compute features in the loader (:mod:`.features`).
"""

from pipeline.data.batch import Batch
from pipeline.data.features import DEFAULT_FEATURES, FEATURES, featurize
from pipeline.data.sessions import SessionLoader
from pipeline.data.shards import ShardIntegrityError, ShardSet
from pipeline.data.stream import SamplerConfig, SubjectBatchLoader

__all__ = [
    "Batch",
    "DEFAULT_FEATURES",
    "FEATURES",
    "SamplerConfig",
    "SessionLoader",
    "ShardIntegrityError",
    "ShardSet",
    "SubjectBatchLoader",
    "featurize",
]
