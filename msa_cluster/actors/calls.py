"""One way to call a role, whether it is a plain object in this process or a Ray actor handle.

Every remote call has a timeout, and a call that times out is cancelled. A dead, restarting or
silent actor, a lost result object, a dead owner and Ray's out-of-memory killer all become
`ShardUnavailableError` (retryable); an error the role raised itself (a ValueError,
MemoryFullError, ...) is re-raised as that same type.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Union

from msa_cluster.types import ShardUnavailableError

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from msa_cluster.actors.coordinator import Coordinator
    from msa_cluster.actors.kv_shard import KVShard
    from msa_cluster.actors.router_shard import RouterShard

__all__ = ["Pending", "submit", "gather", "call", "is_actor", "raise_cause", "RouterHandle", "KVHandle", "CoordinatorHandle"]

log = logging.getLogger(__name__)

# A role is reached either in-process (the plain class, in tests and single-node use) or as a Ray actor.
RouterHandle = Union["RouterShard", "ActorHandle"]
KVHandle = Union["KVShard", "ActorHandle"]
CoordinatorHandle = Union["Coordinator", "ActorHandle"]


def is_actor(handle: Any) -> bool:
    return type(handle).__name__ == "ActorHandle"


@dataclass
class Pending:
    handle: Any
    method: str
    ref: Any = None  # an ObjectRef for actors
    value: Any = None
    error: BaseException | None = None


def submit(handle: Any, method: str, *args: Any, **kwargs: Any) -> Pending:
    """Start a call; plain objects run it now, actors return at once with an ObjectRef."""
    if is_actor(handle):
        return Pending(handle, method, ref=getattr(handle, method).remote(*args, **kwargs))
    try:
        return Pending(handle, method, value=getattr(handle, method)(*args, **kwargs))
    except Exception as e:  # delivered to the caller by gather(), like an actor's error
        return Pending(handle, method, error=e)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """Ray's failures that mean "this shard cannot answer now": the caller may retry."""
    from ray import exceptions as rex

    names = ("RayActorError", "ActorUnavailableError", "ObjectLostError", "OwnerDiedError", "OutOfMemoryError",
             "NodeDiedError", "WorkerCrashedError", "ObjectFetchTimedOutError", "ReferenceCountingAssertionError",
             "TaskCancelledError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def gather(pending: Sequence[Pending], timeout_s: float) -> list[Any]:
    """Results of `pending` in order; raises the first error (ShardUnavailableError for dead/slow actors)."""
    refs = [p.ref for p in pending if p.ref is not None]
    if refs:
        import ray
        from ray import exceptions as rex

        try:
            values = iter(ray.get(refs, timeout=timeout_s))
        except rex.GetTimeoutError as e:
            _cancel(refs)
            names = sorted({p.method for p in pending})
            raise ShardUnavailableError(f"no answer to {names} within {timeout_s:.1f}s") from e
        except rex.RayTaskError as e:
            raise_cause(e)
        except _unavailable_errors() as e:
            _cancel(refs)
            raise ShardUnavailableError(f"a shard is unavailable: {type(e).__name__}: {e}") from e
        for p in pending:
            if p.ref is not None:
                p.value = next(values)
    for p in pending:
        if p.error is not None:
            raise p.error
    return [p.value for p in pending]


def raise_cause(error: BaseException) -> NoReturn:
    """Re-raise a failed remote call's own error (a ValueError, MemoryFullError, ...) as that type;
    Ray's failures that mean "cannot answer now" become ShardUnavailableError."""
    cause = error.cause if getattr(error, "cause", None) is not None else error  # type: ignore[attr-defined]
    if isinstance(cause, _unavailable_errors()):
        raise ShardUnavailableError(f"a shard failed: {type(cause).__name__}: {cause}") from None
    raise cause from None


def _cancel(refs: Sequence[Any]) -> None:
    """Cancel calls that are still queued or running, so a timed-out request leaves no work behind."""
    import ray

    ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in not_ready:
        try:
            ray.cancel(ref)
        except Exception as e:  # cancelling is best effort: the actor may be gone already
            log.debug("could not cancel a timed-out call: %s", e)


def call(handle: Any, method: str, *args: Any, timeout_s: float = 30.0, **kwargs: Any) -> Any:
    return gather([submit(handle, method, *args, **kwargs)], timeout_s)[0]
