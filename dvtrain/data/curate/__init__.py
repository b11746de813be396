"""``dvtrain data curate``: the DINOv2 data-curation pipeline (quality filters, exact and near
deduplication, embedding, hierarchical k-means with balanced sampling, retrieval) writing MDS
shards that ``dvtrain launch`` trains on. See :mod:`dvtrain.data.curate.pipeline`."""

from dvtrain.data.curate.pipeline import STAGES, CurateOptions, CurateResult, curate

__all__ = ["STAGES", "CurateOptions", "CurateResult", "curate"]
