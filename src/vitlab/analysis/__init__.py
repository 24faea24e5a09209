"""The paper's analyses of what a ViT learns (Dosovitskiy et al. 2020, Sec. 4.5, Fig. 6-7, Appendix D.7-D.8).

Each analysis is a function returning tensors; the figures live in :mod:`vitlab.analysis.plots` (matplotlib,
imported lazily) and :func:`inspect_model` runs them all for ``vitlab inspect``.

- :func:`embedding_filters` -- principal components of the patch-embedding filters (Fig. 7 left).
- :func:`pos_embed_similarity`, :func:`pos_embed_topology` -- position-embedding similarity maps and their Spearman
  correlation with 2D grid distance (Fig. 7 centre).
- :func:`mean_attention_distance` -- attention distance per layer and head, in pixels (Fig. 7 right, App. D.7).
- :func:`attention_rollout` -- Abnar & Zuidema's rollout of the class token (Fig. 6, App. D.8).
"""

from vitlab.analysis.distance import attention_distance, mean_attention_distance, patch_distances
from vitlab.analysis.filters import FilterPCA, embedding_filters
from vitlab.analysis.posembed import pos_embed_similarity, pos_embed_topology, rankdata, spearman
from vitlab.analysis.report import inspect_model
from vitlab.analysis.rollout import attention_rollout, query_attention, rollout_maps, rollout_matrix

__all__ = [
    "FilterPCA",
    "attention_distance",
    "attention_rollout",
    "embedding_filters",
    "inspect_model",
    "mean_attention_distance",
    "patch_distances",
    "pos_embed_similarity",
    "pos_embed_topology",
    "query_attention",
    "rankdata",
    "rollout_maps",
    "rollout_matrix",
    "spearman",
]
