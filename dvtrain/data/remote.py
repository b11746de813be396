"""Object-store locations: the one rule for "is this path remote"."""

from __future__ import annotations

__all__ = ["REMOTE_SCHEMES", "is_remote"]

#: URL prefixes mosaicml-streaming reads.
REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "sftp://", "dbfs:/")


def is_remote(location: str) -> bool:
    """True for an object-store URL (``scheme://...`` or ``dbfs:/...``), False for a local path."""
    return "://" in str(location) or str(location).startswith("dbfs:/")
