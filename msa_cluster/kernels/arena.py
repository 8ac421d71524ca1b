"""RouterArena: the router keys of many documents in a list of blocks, with MVCC visibility.

Legend: R routing layers, C chunks, Hkv kv heads, D head dim, E entries, B query rows.

This is the one router-key structure of the package: `InProcessMemory` (model/) and each
`RouterShard` (actors/) hold one arena per tenant, so a query scores only its own tenant's keys.

Storage is a list of blocks [R, capacity, Hkv, D], not one tensor: growing allocates one more block
and copies nothing. (A one-tensor arena held its old and new storage at once while it grew: 12.4 GiB
peak for 5.4 GiB of MSA-4B keys taken commit by commit, BENCHMARKS.md.) A document never spans two
blocks; one larger than a block gets a block of its own size, and `adopt` keeps a bulk read as one
block as it is.

An entry is one version of one document: a contiguous chunk range of one block, visible to store
versions [added, removed) and to placement epochs [epoch_added, epoch_removed). Entries are always
packed in arena order (a block's entries before the next block's, back to back from its start), so
each block's document offsets are the cumulative sum of its chunk counts, derived once per state:
the query path does no per-document Python work. Visibility is one vectorised comparison per
(version, epoch) group of query rows. A query scores each block that a row can see with the exact
`route_top_k` and merges the blocks' top-k lists with `merge_top_k`, the cross-shard merge: the
scores are canonical, so the result equals scoring one contiguous tensor bit for bit.

Removed entries stay until `collect` retires them (the caller decides when no request can still see
them); the arena compacts itself once retired rows are half of it, block by block, and raises the
floor below which pinned requests get SnapshotGoneError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msa_cluster.kernels.routing import merge_top_k
from msa_cluster.kernels.routing_exact import one_torch_thread, route_top_k
from msa_cluster.types import RoutingQuery, ScoredDoc, SnapshotGoneError, routing_row

__all__ = ["RouterArena", "Pin", "BLOCK_CHUNKS"]

NEVER = np.iinfo(np.int64).max  # "not removed" for version and epoch intervals
BLOCK_CHUNKS = 16_384  # chunks per block: 576 MiB of MSA-4B keys (36 KiB a chunk), 12 MiB at msa-tiny shape
_MIN_BLOCK_CHUNKS = 1024  # a small arena's first block; block sizes then double up to block_chunks
_MIN_ENTRIES = 16


@dataclass(frozen=True)
class Pin:
    """What one query row sees: a store version and a placement epoch."""

    version: int
    epoch: int = 0


@dataclass(frozen=True)
class _Span:
    """Entries lo..hi-1, all of them in block `block`: what `route_top_k` takes for that block."""

    block: int
    lo: int
    hi: int
    offsets: torch.Tensor  # [hi - lo + 1] int64 chunk offsets inside the block
    ids: torch.Tensor  # [hi - lo] int64 doc ids
    chunks: int  # chunks the entries fill, from the block's start


class _Blocks:
    """Key storage: blocks [R, capacity, Hkv, D] of one dtype; only the last one takes new documents."""

    def __init__(self, block_chunks: int, device: torch.device):
        self.block_chunks, self.device = block_chunks, device
        self.tensors: list[torch.Tensor] = []
        self.tail = 0  # chunks used in the last block

    def keep(self, block: torch.Tensor, used: int) -> int:
        """Take `block` [R, capacity, Hkv, D] as it is, its first `used` chunks filled; returns its index."""
        self.tensors.append(block)
        self.tail = used
        return len(self.tensors) - 1

    def place(self, keys: torch.Tensor, pending: int) -> int:
        """Copy one document's keys [R, C, Hkv, D] after the last one; returns its block. Where they do
        not fit, a new block: block_chunks, or less while the arena is small (`pending` chunks are on
        their way, these included), or C where the document is larger than a block."""
        c = int(keys.shape[1])
        if not self.tensors or self.tail + c > self.tensors[-1].shape[1]:
            allocated = sum(int(t.shape[1]) for t in self.tensors)
            cap = max(c, min(self.block_chunks, max(_MIN_BLOCK_CHUNKS, allocated, pending)))
            like = self.tensors[0] if self.tensors else keys
            self.keep(torch.empty(keys.shape[0], cap, *keys.shape[2:], dtype=like.dtype, device=self.device), 0)
        self.tensors[-1][:, self.tail : self.tail + c] = keys  # converts dtype and device in the copy
        self.tail += c
        return len(self.tensors) - 1


class RouterArena:
    """Router keys of one tenant's documents (or any set) in blocks [R, capacity, Hkv, D], versioned.

    block_chunks: chunks per block (a larger document gets a block of its own size).
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

    def __init__(self, routing_layers: Sequence[int], *, device: str | torch.device = "cpu", compact_min_chunks: int = 1024,
                 block_chunks: int = BLOCK_CHUNKS):
        if block_chunks < 1:
            raise ValueError(f"block_chunks must be >= 1, got {block_chunks}")
        self.routing_layers = tuple(int(x) for x in routing_layers)
        self.compact_min_chunks = compact_min_chunks
        self.block_chunks = block_chunks
        self.device = torch.device(device)
        self.floor = Pin(0, 0)  # requests pinned below this may have lost entries: SnapshotGoneError
        self._blocks = _Blocks(block_chunks, self.device)
        self._used = 0  # chunks of all entries (live, removed and retired alike, until compaction)
        self._n = 0  # entries
        self._cols = {name: np.zeros(_MIN_ENTRIES, dtype=np.int64)
                      for name in ("doc", "count", "block", "added", "removed", "e_added", "e_removed")}
        self._removed_at = np.full(_MIN_ENTRIES, math.inf)  # wall time of the removal
        self._retired = np.zeros(_MIN_ENTRIES, dtype=bool)  # no request can see it any more
        self._payload: list[Any] = []  # per entry, for the owner (InProcessMemory keeps the document)
        self._live: dict[int, int] = {}  # doc id -> entry visible at the newest version and epoch
        self._history: dict[int, list[int]] = {}  # doc id -> its entries, oldest first
        # Derived per state: the blocks' spans (dropped when entries come or go), and the visibility
        # masks of the last few pins (dropped on every change; bounded: a request pins one version,
        # few are in flight at once).
        self._spans_cache: list[_Span] | None = None
        self._masks: dict[Pin, torch.Tensor] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def held_chunks(self) -> int:
        """Chunks of every entry not retired yet: live ones and removed ones a request may still see."""
        n = self._n
        return int(self._cols["count"][:n][~self._retired[:n]].sum())

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk across all routing layers (0 before the first document)."""
        blocks = self._blocks.tensors
        return 0 if not blocks else blocks[0][:, :1].numel() * blocks[0].element_size()

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
        dims = self._blocks.tensors[0].shape[2:] if self._blocks.tensors else None
        for doc_id, keys in docs:
            dims = dims or keys.shape[2:]
            if keys.dim() != 4 or keys.shape[0] != len(self.routing_layers) or keys.shape[1] < 1:
                raise ValueError(f"router keys of document {doc_id} have shape {tuple(keys.shape)}; "
                                 f"expected [R={len(self.routing_layers)}, C>=1, Hkv, D]")
            if keys.shape[2:] != dims:
                raise ValueError(f"router keys [.., Hkv, D] = {tuple(keys.shape[2:])} of document {doc_id} do not match "
                                 f"the arena's {tuple(dims)}")
        self.remove([d for d, _ in docs if d in self._live], version=version, now=now)
        pending = sum(int(k.shape[1]) for _, k in docs)
        blocks = []
        for _, keys in docs:
            blocks.append(self._blocks.place(keys, pending))
            pending -= int(keys.shape[1])
            self._used += int(keys.shape[1])
        self._add_entries([(d, int(k.shape[1])) for d, k in docs], blocks, version, epoch, payloads)

    def adopt(self, keys: torch.Tensor, docs: Sequence[tuple[int, int]], *, version: int, epoch: int = 0) -> None:
        """Fill an empty arena with `keys` [R, C, Hkv, D] as one block, without a copy on its device:
        documents [(doc_id, chunks)] lie in it back to back, in order (what a shard's bulk load reads).

        A 10M-token load at MSA-4B shape holds 5.4 GiB of keys; `append` would hold them twice.
        """
        if self._blocks.tensors or self._n:
            raise ValueError("adopt fills an empty arena only; use append")
        if keys.dim() != 4 or keys.shape[0] != len(self.routing_layers) or sum(c for _, c in docs) != keys.shape[1]:
            raise ValueError(f"router keys of shape {tuple(keys.shape)} do not hold the {sum(c for _, c in docs)} chunks of "
                             f"{len(docs)} documents in R={len(self.routing_layers)} layers")
        if any(c < 1 for _, c in docs) or len({d for d, _ in docs}) != len(docs):
            raise ValueError("adopt needs distinct documents of at least one chunk each")
        block = self._blocks.keep(keys.to(self.device).contiguous(), int(keys.shape[1]))
        self._used = int(keys.shape[1])
        self._add_entries(docs, [block] * len(docs), version, epoch, None)

    def _add_entries(self, docs: Sequence[tuple[int, int]], blocks: Sequence[int], version: int, epoch: int,
                     payloads: Sequence[Any] | None) -> None:
        """Entries for documents [(doc_id, chunks)] whose keys were just placed at the ends of `blocks`."""
        self._spans_cache, self._masks = None, {}
        for j, ((doc_id, c), block) in enumerate(zip(docs, blocks)):
            i = self._new_entry(int(doc_id), c, block, version, epoch, None if payloads is None else payloads[j])
            self._live[int(doc_id)] = i
            self._history.setdefault(int(doc_id), []).append(i)

    def remove(self, doc_ids: Sequence[int], *, version: int | None = None, epoch: int | None = None,
               now: float = 0.0) -> None:
        """Stop showing live documents from `version` on (a delete) or from `epoch` on (moved away)."""
        self._masks = {}
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
            self._masks = {}
        if self._used > self.compact_min_chunks and 2 * self.held_chunks < self._used:
            self._compact()
        return int(fresh.sum())

    def raise_floor(self, pin: Pin) -> None:
        """Requests pinned below `pin` get SnapshotGoneError (e.g. the history before a reload)."""
        self.floor = Pin(max(self.floor.version, pin.version), max(self.floor.epoch, pin.epoch))

    # ------------------------------------------------------------------ queries
    def visible(self, pin: Pin) -> torch.Tensor:
        """[E] bool: entries a request pinned at `pin` sees (one vectorised comparison, then cached)."""
        mask = self._masks.get(pin)
        if mask is None:
            n, c = self._n, self._cols
            m = (c["added"][:n] <= pin.version) & (pin.version < c["removed"][:n])
            m &= (c["e_added"][:n] <= pin.epoch) & (pin.epoch < c["e_removed"][:n]) & ~self._retired[:n]
            if len(self._masks) >= 8:
                self._masks = {}
            mask = self._masks[pin] = torch.from_numpy(m)
        return mask

    def _spans(self) -> list[_Span]:
        """One span per block that holds entries, in block order (per block, not per document)."""
        if self._spans_cache is None:
            n = self._n
            blocks, counts = self._cols["block"][:n], self._cols["count"][:n]
            edges = [0, *(np.flatnonzero(np.diff(blocks)) + 1).tolist(), n] if n else [0]
            spans = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts[lo:hi])]))  # [hi - lo + 1]
                ids = torch.from_numpy(self._cols["doc"][lo:hi].copy())  # [hi - lo]
                spans.append(_Span(int(blocks[lo]), lo, hi, offsets, ids, int(offsets[-1])))
            self._spans_cache = spans
        return self._spans_cache

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
        if self._n == 0:
            return [[] for _ in pins]
        r = routing_row(self.routing_layers, layer)
        q = query if query.vectors.device == self.device else _moved(query, self.device)
        masks = {pin: self.visible(pin) for pin in set(pins)}
        visible = torch.stack([masks[pin] for pin in pins])  # [B, E]
        parts = []
        # torch stays on one thread across the blocks and each call's tile workers own the cores: with
        # torch's own threads switched on and off around every call, two blocks of 16K chunks took
        # 1.06-1.30x the CPU time of one tensor at B=1 on 2 loaded cores; held across, 0.86-1.0x
        workers = torch.get_num_threads()
        with one_torch_thread():
            for span in self._spans():
                seen = visible[:, span.lo : span.hi]  # [B, hi - lo]
                if seen.any():
                    keys = self._blocks.tensors[span.block][r, : span.chunks]  # [C, Hkv, D]
                    parts.append(route_top_k(q, keys, span.offsets, span.ids, top_k, seen, workers=workers))
        if len(parts) <= 1:
            return parts[0] if parts else [[] for _ in pins]
        return merge_top_k(parts, top_k)

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
    def _new_entry(self, doc_id: int, count: int, block: int, version: int, epoch: int, payload: Any) -> int:
        if self._n == len(self._retired):
            grow = 2 * self._n
            self._cols = {k: np.resize(v, grow) for k, v in self._cols.items()}
            self._removed_at = np.concatenate([self._removed_at, np.full(grow - self._n, math.inf)])
            self._retired = np.concatenate([self._retired, np.zeros(grow - self._n, dtype=bool)])
        i = self._n
        for name, value in (("doc", doc_id), ("count", count), ("block", block), ("added", version), ("removed", NEVER),
                            ("e_added", epoch), ("e_removed", NEVER)):
            self._cols[name][i] = value
        self._removed_at[i], self._retired[i] = math.inf, False
        self._payload.append(payload)
        self._n += 1
        return i

    def _compact(self) -> None:
        """Drop retired entries and pack the rest in order, block by block: a block without retired
        entries is kept as it is; the others are copied into new blocks and each freed once copied,
        so the copy never holds the old and the new storage whole at once."""
        n = self._n
        kept = ~self._retired[:n]
        keep = np.flatnonzero(kept)
        total = pending = int(self._cols["count"][:n][keep].sum())
        old: list[torch.Tensor | None] = list(self._blocks.tensors)
        spans = self._spans()
        self._blocks = _Blocks(self.block_chunks, self.device)
        block_of = np.zeros(n, dtype=np.int64)
        for span in spans:
            src = old[span.block]
            assert src is not None
            old[span.block] = None
            mine = np.flatnonzero(kept[span.lo : span.hi])  # kept entries of this block, block-relative
            if len(mine) == span.hi - span.lo:
                block_of[span.lo : span.hi] = self._blocks.keep(src, span.chunks)
                pending -= span.chunks
                continue
            bounds = span.offsets.tolist()
            for j in mine.tolist():
                block_of[span.lo + j] = self._blocks.place(src[:, bounds[j] : bounds[j + 1]], pending)
                pending -= bounds[j + 1] - bounds[j]
            del src  # the last reference: this block is freed before the next one is copied
        self._spans_cache, self._masks = None, {}
        self._used = total
        size = max(_MIN_ENTRIES, len(keep))
        self._cols = {k: np.resize(v[:n][keep], size) for k, v in self._cols.items()}
        self._cols["block"][: len(keep)] = block_of[keep]
        self._removed_at = np.concatenate([self._removed_at[:n][keep], np.full(size - len(keep), math.inf)])
        self._retired = np.zeros(size, dtype=bool)
        self._payload = [self._payload[i] for i in keep]
        self._n = len(keep)
        remap = {int(old_i): new for new, old_i in enumerate(keep)}
        self._live = {d: remap[i] for d, i in self._live.items()}
        self._history = {}
        for new in range(self._n):
            self._history.setdefault(int(self._cols["doc"][new]), []).append(new)


def _moved(query: RoutingQuery, device: torch.device) -> RoutingQuery:
    return RoutingQuery(query.vectors.to(device), query.mask.to(device), query.spec, query.folded)
