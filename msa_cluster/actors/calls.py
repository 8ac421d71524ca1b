"""One way to call a role, whether it is a plain object in this process or a Ray actor handle.

Every remote call has a timeout. A dead or silent actor becomes `ShardUnavailable`; an error the
role raised itself (a ValueError, MemoryFullError, ...) is re-raised as that same type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from msa_cluster.types import ShardUnavailable

__all__ = ["Pending", "submit", "gather", "call", "is_actor"]


def is_actor(handle: Any) -> bool:
    return type(handle).__name__ == "ActorHandle"


@dataclass
class Pending:
    handle: Any
    method: str
    ref: Any = None  # an ObjectRef for actors
    value: Any = None
    error: BaseException | None = None


def submit(handle: Any, method: str, *args, **kwargs) -> Pending:
    """Start a call; plain objects run it now, actors return at once with an ObjectRef."""
    if is_actor(handle):
        return Pending(handle, method, ref=getattr(handle, method).remote(*args, **kwargs))
    try:
        return Pending(handle, method, value=getattr(handle, method)(*args, **kwargs))
    except Exception as e:  # delivered to the caller by gather(), like an actor's error
        return Pending(handle, method, error=e)


def gather(pending: Sequence[Pending], timeout_s: float) -> list[Any]:
    """Results of `pending` in order; raises the first error (ShardUnavailable for dead/slow actors)."""
    refs = [p.ref for p in pending if p.ref is not None]
    if refs:
        import ray
        from ray import exceptions as rex

        try:
            values = iter(ray.get(refs, timeout=timeout_s))
        except rex.GetTimeoutError as e:
            names = sorted({p.method for p in pending})
            raise ShardUnavailable(f"no answer to {names} within {timeout_s:.1f}s") from e
        except (rex.RayActorError, rex.ActorUnavailableError) as e:
            raise ShardUnavailable(f"an actor died or is restarting: {e}") from e
        except rex.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            raise cause from None
        for p in pending:
            if p.ref is not None:
                p.value = next(values)
    for p in pending:
        if p.error is not None:
            raise p.error
    return [p.value for p in pending]


def call(handle: Any, method: str, *args, timeout_s: float = 30.0, **kwargs) -> Any:
    return gather([submit(handle, method, *args, **kwargs)], timeout_s)[0]
