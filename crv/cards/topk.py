"""Per-feature top-n of a stream, in memory bounded by features x n.

A feature card needs each feature's strongest activations over millions of tokens, but
keeping every (feature, token) pair costs tokens x k entries. `StreamingTopK` holds only
the current n best entries per feature (value, stream order, an integer payload such as
the token window) and merges each batch into them: candidates not above a feature's
current n-th value are dropped first, the rest are sorted together with the kept entries
of the features they touch. Ties in value go to the entry that came first in the stream,
so the result equals a brute-force top-n over the whole stream with that tie-break.
"""

from __future__ import annotations

import numpy as np


class StreamingTopK:
    """The n largest values per feature of a stream of entries (feature, value, token).

    Entries point at tokens of the current batch; each token has a stream `order`
    (increasing across `update` calls; it breaks ties, earlier first) and an int64 payload
    row of `payload_width` numbers kept with the entry (where the token is, its context).
    Memory: n_features x n x (payload_width + 2) numbers.
    """

    def __init__(self, n_features: int, n: int, payload_width: int) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        self.n_features, self.n, self.payload_width = n_features, n, payload_width
        self.values_FN = np.full((n_features, n), -np.inf, dtype=np.float32)
        self.order_FN = np.full((n_features, n), -1, dtype=np.int64)
        self.payload_FNP = np.full((n_features, n, payload_width), -1, dtype=np.int64)

    def update(
        self,
        feature_M: np.ndarray,
        value_M: np.ndarray,
        token_M: np.ndarray,
        order_N: np.ndarray,
        payload_NP: np.ndarray,
    ) -> None:
        """Merge M entries on N tokens; `order_N` must exceed every order seen before."""
        value_M = np.asarray(value_M, dtype=np.float32)
        feature_M = np.asarray(feature_M, dtype=np.int64)
        keep = value_M > self.values_FN[feature_M, -1]
        if not keep.any():
            return
        feature_M, value_M, token_M = feature_M[keep], value_M[keep], np.asarray(token_M)[keep]
        order_M, payload_MP = np.asarray(order_N)[token_M], np.asarray(payload_NP)[token_M]
        touched_T = np.unique(feature_M)
        old_valid_TN = np.isfinite(self.values_FN[touched_T])
        t_idx, slot = np.nonzero(old_valid_TN)
        feats = np.concatenate([touched_T[t_idx], feature_M])
        vals = np.concatenate([self.values_FN[touched_T[t_idx], slot], value_M])
        orders = np.concatenate([self.order_FN[touched_T[t_idx], slot], order_M])
        payloads = np.concatenate([self.payload_FNP[touched_T[t_idx], slot], payload_MP])
        perm = np.lexsort((orders, -vals, feats))
        feats, vals, orders, payloads = feats[perm], vals[perm], orders[perm], payloads[perm]
        first = np.searchsorted(feats, feats, side="left")
        rank = np.arange(len(feats)) - first
        sel = rank < self.n
        self.values_FN[touched_T] = -np.inf
        self.order_FN[touched_T] = -1
        self.payload_FNP[touched_T] = -1
        f, r = feats[sel], rank[sel]
        self.values_FN[f, r] = vals[sel]
        self.order_FN[f, r] = orders[sel]
        self.payload_FNP[f, r] = payloads[sel]

    def counts(self) -> np.ndarray:
        """Entries held per feature, [F] (n once a feature has been seen n times)."""
        return np.isfinite(self.values_FN).sum(1)
