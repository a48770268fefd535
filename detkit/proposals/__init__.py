"""Region proposals that are not learned: selective search (Uijlings et al. 2013) as R-CNN, SPP-net and
Fast R-CNN use it, an on-disk cache of each dataset's proposals, the detector's proposal sources that hand
them on (``precomputed``), and proposal recall (Faster R-CNN Sec. 4.1)."""
from detkit.proposals.cache import (CACHE_VERSION, ProposalCache, ProposalCacheError, fill_cache,
                                    selective_search_cache)
from detkit.proposals.recall import format_recall_table, plot_recall, proposal_recall
from detkit.proposals.selective_search import selective_search

__all__ = ["CACHE_VERSION", "ProposalCache", "ProposalCacheError", "fill_cache", "selective_search_cache",
           "format_recall_table", "plot_recall", "proposal_recall", "selective_search"]
