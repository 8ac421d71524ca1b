"""RouterArena: the router keys of many documents in one append-only tensor, with MVCC visibility.

Legend: R routing layers, C chunks, Hkv kv heads, D head dim, E entries, B query rows.

This is the one router-key structure of the package: `InProcessMemory` (model/) and each
`RouterShard` (actors/) hold one arena per tenant, so a query scores only its own tenant's keys.

An entry is one version of one document: a contiguous chunk range of the arena, visible to store
versions [added, removed) and to placement epochs [epoch_added, epoch_removed). Entries are
always packed in arena order, so document offsets are the cumulative sum of chunk counts and the
query path does no per-document Python work: visibility is one vectorised comparison per
(version, epoch) group of query rows. Removed entries stay until `collect` retires them (the
caller decides when no request can still see them); the arena compacts itself once retired rows
are half of it, and raises the floor below which pinned requests get SnapshotGoneError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msa_cluster.kernels.routing_exact import route_top_k
from msa_cluster.types import RoutingQuery, ScoredDoc, SnapshotGoneError, routing_row

__all__ = ["RouterArena", "Pin"]

NEVER = np.iinfo(np.int64).max  # "not removed" for version and epoch intervals
_MIN_ENTRIES = 16


@dataclass(frozen=True)
class Pin:
    """What one query row sees: a store version and a placement epoch."""

    version: int
    epoch: int = 0


class RouterArena:
    """Router keys [R, capacity, Hkv, D] of one tenant's documents (or any set), versioned.

    compact_min_chunks: below this many chunks the arena never compacts (copying is not worth it).

    Example:
        >>> arena = RouterArena((2, 3))
        >>> keys = torch.randn(2, 3, 1, 4)                        # [R, C, Hkv, D]: 3 chunks
        >>> arena.append([(7, keys)], version=1)
        >>> arena.live_ids(), arena.held_chunks
        ([7], 3)
        >>> arena.remove([7], version=2)
        >>> arena.visible_ids(Pin(1)), arena.visible_ids(Pin(2))
        ([7], [])
    """

    def __init__(self, routing_layers: Sequence[int], *, device: str | torch.device = "cpu", compact_min_chunks: int = 1024):
        self.routing_layers = tuple(int(x) for x in routing_layers)
        self.compact_min_chunks = compact_min_chunks
        self.device = torch.device(device)
        self.floor = Pin(0, 0)  # requests pinned below this may have lost entries: SnapshotGoneError
        self._keys: torch.Tensor | None = None  # [R, capacity, Hkv, D]
        self._used = 0  # chunks in use (live, removed and retired entries alike, until compaction)
        self._n = 0  # entries
        self._cols = {name: np.zeros(_MIN_ENTRIES, dtype=np.int64) for name in ("doc", "count", "added", "removed", "e_added", "e_removed")}
        self._removed_at = np.full(_MIN_ENTRIES, math.inf)  # wall time of the removal
        self._retired = np.zeros(_MIN_ENTRIES, dtype=bool)  # no request can see it any more
        self._payload: list[Any] = []  # per entry, for the owner (InProcessMemory keeps the document)
        self._live: dict[int, int] = {}  # doc id -> entry visible at the newest version and epoch
        self._history: dict[int, list[int]] = {}  # doc id -> its entries, oldest first
        # Derived per state, dropped on every change: offsets [E + 1] and ids [E], and the visibility
        # masks of the last few pins (bounded: a request pins one version, few are in flight at once).
        self._derived: dict[object, torch.Tensor] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def held_chunks(self) -> int:
        """Chunks of every entry not retired yet: live ones and removed ones a request may still see."""
        n = self._n
        return int(self._cols["count"][:n][~self._retired[:n]].sum())

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk across all routing layers (0 before the first document)."""
        return 0 if self._keys is None else self._keys[:, :1].numel() * self._keys.element_size()

    def __len__(self) -> int:
        return len(self._live)

    def live_ids(self) -> list[int]:
        return sorted(self._live)

    def live_chunks(self) -> int:
        return int(sum(self._cols["count"][i] for i in self._live.values()))

    # ------------------------------------------------------------------ changes
    def append(self, docs: Sequence[tuple[int, torch.Tensor]], *, version: int, epoch: int = 0,
               payloads: Sequence[Any] | None = None, now: float = 0.0) -> None:
        """Add documents [(doc_id, keys [R, C, Hkv, D])] visible from `version` and `epoch` on.

        A document already live is replaced: its old entry stops being visible at `version`.
        """
        for doc_id, keys in docs:
            if keys.dim() != 4 or keys.shape[0] != len(self.routing_layers) or keys.shape[1] < 1:
                raise ValueError(f"router keys of document {doc_id} have shape {tuple(keys.shape)}; "
                                 f"expected [R={len(self.routing_layers)}, C>=1, Hkv, D]")
        self.remove([d for d, _ in docs if d in self._live], version=version, now=now)
        self._derived = {}
        self._grow_keys(sum(int(k.shape[1]) for _, k in docs), docs[0][1] if docs else None)
        for _, keys in docs:
            assert self._keys is not None
            c = int(keys.shape[1])
            self._keys[:, self._used : self._used + c] = keys.to(self.device, self._keys.dtype)
            self._used += c
        self._add_entries([(d, int(k.shape[1])) for d, k in docs], version, epoch, payloads)

    def adopt(self, keys: torch.Tensor, docs: Sequence[tuple[int, int]], *, version: int, epoch: int = 0) -> None:
        """Fill an empty arena with `keys` [R, C, Hkv, D] as its storage, without a copy on its device:
        documents [(doc_id, chunks)] lie in it back to back, in order (what a shard's bulk load reads).

        A 10M-token load at MSA-4B shape holds 5.4 GiB of keys; `append` would hold them twice.
        """
        if self._keys is not None or self._n:
            raise ValueError("adopt fills an empty arena only; use append")
        if keys.dim() != 4 or keys.shape[0] != len(self.routing_layers) or sum(c for _, c in docs) != keys.shape[1]:
            raise ValueError(f"router keys of shape {tuple(keys.shape)} do not hold the {sum(c for _, c in docs)} chunks of "
                             f"{len(docs)} documents in R={len(self.routing_layers)} layers")
        if any(c < 1 for _, c in docs) or len({d for d, _ in docs}) != len(docs):
            raise ValueError("adopt needs distinct documents of at least one chunk each")
        self._derived = {}
        self._keys, self._used = keys.to(self.device).contiguous(), int(keys.shape[1])
        self._add_entries(docs, version, epoch, None)

    def _add_entries(self, docs: Sequence[tuple[int, int]], version: int, epoch: int, payloads: Sequence[Any] | None) -> None:
        """Entries for documents [(doc_id, chunks)] whose keys were just placed at the end of the storage."""
        for j, (doc_id, c) in enumerate(docs):
            i = self._new_entry(int(doc_id), c, version, epoch, None if payloads is None else payloads[j])
            self._live[int(doc_id)] = i
            self._history.setdefault(int(doc_id), []).append(i)

    def remove(self, doc_ids: Sequence[int], *, version: int | None = None, epoch: int | None = None,
               now: float = 0.0) -> None:
        """Stop showing live documents from `version` on (a delete) or from `epoch` on (moved away)."""
        self._derived = {k: v for k, v in self._derived.items() if not isinstance(k, Pin)}
        for doc_id in doc_ids:
            i = self._live.pop(int(doc_id), None)
            if i is None:
                continue
            if version is not None:
                self._cols["removed"][i] = version
            if epoch is not None:
                self._cols["e_removed"][i] = epoch
            self._removed_at[i] = now

    def collect(self, *, removed_before_s: float | None = None, below: Pin | None = None) -> int:
        """Retire removed entries no request can see; returns how many. Compacts when half is retired.

        removed_before_s: entries removed at or before this wall time (a grace period ended).
        below: entries invisible to every pin >= `below` (the oldest pin still in use).
        """
        n = self._n
        c = self._cols
        gone = np.zeros(n, dtype=bool)
        if removed_before_s is not None:
            gone |= (self._removed_at[:n] <= removed_before_s) & (self._removed_at[:n] < math.inf)
        if below is not None:
            gone |= (c["removed"][:n] <= below.version) | (c["e_removed"][:n] <= below.epoch)
        fresh = gone & ~self._retired[:n]
        if fresh.any():
            rv, re_ = c["removed"][:n][fresh], c["e_removed"][:n][fresh]
            v = int(rv[rv != NEVER].max()) if (rv != NEVER).any() else self.floor.version
            e = int(re_[re_ != NEVER].max()) if (re_ != NEVER).any() else self.floor.epoch
            self.floor = Pin(max(self.floor.version, v), max(self.floor.epoch, e))
            self._retired[:n] |= fresh
            self._derived = {k: v for k, v in self._derived.items() if not isinstance(k, Pin)}
        if self._used > self.compact_min_chunks and 2 * self.held_chunks < self._used:
            self._compact()
        return int(fresh.sum())

    def raise_floor(self, pin: Pin) -> None:
        """Requests pinned below `pin` get SnapshotGoneError (e.g. the history before a reload)."""
        self.floor = Pin(max(self.floor.version, pin.version), max(self.floor.epoch, pin.epoch))

    # ------------------------------------------------------------------ queries
    def visible(self, pin: Pin) -> torch.Tensor:
        """[E] bool: entries a request pinned at `pin` sees (one vectorised comparison, then cached)."""
        mask = self._derived.get(pin)
        if mask is None:
            n, c = self._n, self._cols
            m = (c["added"][:n] <= pin.version) & (pin.version < c["removed"][:n])
            m &= (c["e_added"][:n] <= pin.epoch) & (pin.epoch < c["e_removed"][:n]) & ~self._retired[:n]
            if sum(isinstance(k, Pin) for k in self._derived) >= 8:
                self._derived = {k: v for k, v in self._derived.items() if not isinstance(k, Pin)}
            mask = self._derived[pin] = torch.from_numpy(m)
        return mask

    def _columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets [E + 1], doc ids [E]) of the packed entries."""
        if "offsets" not in self._derived:
            counts = torch.from_numpy(self._cols["count"][: self._n])
            self._derived["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            self._derived["ids"] = torch.from_numpy(self._cols["doc"][: self._n].copy())
        return self._derived["offsets"], self._derived["ids"]

    def visible_ids(self, pin: Pin) -> list[int]:
        self.check(pin)
        return sorted(int(d) for d in self._cols["doc"][: self._n][self.visible(pin).numpy()])

    def check(self, pin: Pin) -> None:
        if pin.version < self.floor.version or pin.epoch < self.floor.epoch:
            raise SnapshotGoneError(f"version {pin.version} (placement epoch {pin.epoch}) is older than this memory "
                                    f"keeps (version {self.floor.version}, epoch {self.floor.epoch}); take a new snapshot")

    def score(self, layer: int, query: RoutingQuery, top_k: int, pins: Sequence[Pin]) -> list[list[ScoredDoc]]:
        """Top-k documents of each query row among the entries its pin sees: [B] lists, best first."""
        if len(pins) != query.batch_size:
            raise ValueError(f"{query.batch_size} query rows need {query.batch_size} pins, got {len(pins)}")
        for pin in set(pins):
            self.check(pin)
        if self._n == 0 or self._keys is None:
            return [[] for _ in pins]
        r = routing_row(self.routing_layers, layer)
        offsets, ids = self._columns()  # [E + 1], [E]
        q = query if query.vectors.device == self.device else _moved(query, self.device)
        masks = {pin: self.visible(pin) for pin in set(pins)}
        visible = torch.stack([masks[pin] for pin in pins])  # [B, E]
        return route_top_k(q, self._keys[r, : self._used], offsets, ids, top_k, visible)

    def entry(self, doc_id: int, pin: Pin) -> int | None:
        """Index of the entry of `doc_id` that `pin` sees, or None."""
        c = self._cols
        for i in reversed(self._history.get(int(doc_id), [])):
            if (c["added"][i] <= pin.version < c["removed"][i] and c["e_added"][i] <= pin.epoch < c["e_removed"][i]
                    and not self._retired[i]):
                return i
        return None

    def payload(self, i: int) -> Any:
        return self._payload[i]

    # ------------------------------------------------------------------ storage
    def _new_entry(self, doc_id: int, count: int, version: int, epoch: int, payload: Any) -> int:
        if self._n == len(self._retired):
            grow = 2 * self._n
            self._cols = {k: np.resize(v, grow) for k, v in self._cols.items()}
            self._removed_at = np.concatenate([self._removed_at, np.full(grow - self._n, math.inf)])
            self._retired = np.concatenate([self._retired, np.zeros(grow - self._n, dtype=bool)])
        i = self._n
        for name, value in (("doc", doc_id), ("count", count), ("added", version), ("removed", NEVER),
                            ("e_added", epoch), ("e_removed", NEVER)):
            self._cols[name][i] = value
        self._removed_at[i], self._retired[i] = math.inf, False
        self._payload.append(payload)
        self._n += 1
        return i

    def _grow_keys(self, extra: int, sample: torch.Tensor | None) -> None:
        if sample is None:
            return
        if self._keys is None:
            self._keys = torch.empty(len(self.routing_layers), 0, *sample.shape[2:], dtype=sample.dtype, device=self.device)
        elif tuple(sample.shape[2:]) != tuple(self._keys.shape[2:]):
            raise ValueError(f"router keys [.., Hkv, D] = {tuple(sample.shape[2:])} do not match the arena's "
                             f"{tuple(self._keys.shape[2:])}")
        need = self._used + extra
        if need > self._keys.shape[1]:  # by a quarter, not double: at 10M tokens of MSA-4B keys, doubling would add 5.4 GiB
            cap = self._keys.shape[1]
            grown = self._keys.new_empty(self._keys.shape[0], max(need, cap + cap // 4, 1024), *self._keys.shape[2:])
            grown[:, : self._used] = self._keys[:, : self._used]
            self._keys = grown

    def _compact(self) -> None:
        """Drop retired entries and pack the rest in order (offsets stay a cumulative sum)."""
        assert self._keys is not None
        self._derived = {}
        n = self._n
        keep = np.flatnonzero(~self._retired[:n])
        counts = self._cols["count"][:n]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rows = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in keep])
                                if len(keep) else np.zeros(0, dtype=np.int64))
        keys = self._keys.new_empty(self._keys.shape[0], max(len(rows), 1024), *self._keys.shape[2:])
        keys[:, : len(rows)] = self._keys[:, rows.to(self.device)]
        self._keys, self._used = keys, len(rows)
        size = max(_MIN_ENTRIES, len(keep))
        self._cols = {k: np.resize(v[:n][keep], size) for k, v in self._cols.items()}
        self._removed_at = np.concatenate([self._removed_at[:n][keep], np.full(size - len(keep), math.inf)])
        self._retired = np.zeros(size, dtype=bool)
        self._payload = [self._payload[i] for i in keep]
        self._n = len(keep)
        remap = {int(old): new for new, old in enumerate(keep)}
        self._live = {d: remap[i] for d, i in self._live.items()}
        self._history = {}
        for new in range(self._n):
            self._history.setdefault(int(self._cols["doc"][new]), []).append(new)


def _moved(query: RoutingQuery, device: torch.device) -> RoutingQuery:
    return RoutingQuery(query.vectors.to(device), query.mask.to(device), query.spec, query.folded)
