"""The teacher-logit cache on disk, one job per module (the format itself is described in spec.py):

- spec: constants, shard attribute order, id dtype, shard names (what the files hold)
- codec: the sampled mode's varint packing (entries <-> bytes)
- parts: part files (.npz) the cache stage writes so a killed run resumes
- writer: assemble_shard, a shard's parts concatenated into one HDF5 shard
- manifest: manifest.json, written once every shard is there
- verify: a cache's files against its manifest, its attributes against a run's
- reader: CacheReader, rows of one split through memmaps

Callers import from here (``from pipeline.cache_format import CacheReader``).
"""

from pipeline.cache_format.codec import pack_varints, sampled_codes, unpack_sampled_row, unpack_varints
from pipeline.cache_format.manifest import manifest_attrs, read_manifest, write_manifest
from pipeline.cache_format.parts import read_part, read_part_shapes, write_part
from pipeline.cache_format.reader import CacheReader, read_shard_attrs
from pipeline.cache_format.spec import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODES,
    PART_KEYS,
    PER_SHARD_ATTRS,
    PER_SPLIT_ATTRS,
    REBUILD,
    REQUIRED_ATTRS,
    SHARD_ATTR_ORDER,
    SHARD_DATASETS,
    id_dtype_for,
    shard_name,
)
from pipeline.cache_format.verify import check_compatible, verify_cache
from pipeline.cache_format.writer import assemble_shard

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODES",
    "PART_KEYS",
    "PER_SHARD_ATTRS",
    "PER_SPLIT_ATTRS",
    "REBUILD",
    "REQUIRED_ATTRS",
    "SHARD_ATTR_ORDER",
    "SHARD_DATASETS",
    "CacheReader",
    "assemble_shard",
    "check_compatible",
    "id_dtype_for",
    "manifest_attrs",
    "pack_varints",
    "read_manifest",
    "read_part",
    "read_part_shapes",
    "read_shard_attrs",
    "sampled_codes",
    "shard_name",
    "unpack_sampled_row",
    "unpack_varints",
    "verify_cache",
    "write_manifest",
    "write_part",
]
