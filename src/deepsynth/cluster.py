"""Ray, the optional engine for jobs larger than one machine (``pip install 'deepsynth[cluster]'``).

`deepsynth prepare --engine ray` (`deepsynth.data.ray_prepare`) converts and renders in Ray Data
tasks; `deepsynth evaluate --engine ray` and `deepsynth predict --engine ray`
(`deepsynth.evaluation.ray_inference`) answer with model replicas held by Ray actors. Ray does
the scheduling, the retries of failed tasks and the restarts of dead actors; this module only
imports Ray with a clear error when it is missing and connects to (or starts) an instance. Ray
Data's own defaults govern failures: a task whose worker died runs again and a replica actor that
died is restarted, while an exception raised by our code fails the job (it would fail the same way
again). See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ClusterError", "RaySettings", "ENGINES", "require_ray", "ray_session", "check_engine",
           "ordered_execution"]

ENGINES = ("local", "ray")
INSTALL_HINT = "pip install 'deepsynth[cluster]'"


class ClusterError(RuntimeError):
    """The Ray engine cannot run (Ray missing, a bad setting); the message says what to do."""


@dataclass
class RaySettings:
    """Which Ray instance a command uses."""

    # None: join the instance `RAY_ADDRESS` names, else start a local one for this command;
    # "auto": join the cluster running on this machine (`ray start --head`, `ray up`, KubeRay);
    # "ray://HOST:10001": connect through Ray Client.
    address: str | None = None
    # CPUs of a local instance started for the command (None: all of this machine's).
    num_cpus: int | None = None
    # Object store size in bytes of a local instance started for the command (None: Ray's default,
    # about 30% of memory; blocks beyond it spill to disk).
    object_store_memory: int | None = None

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ClusterError(f"num_cpus={self.num_cpus!r}: must be >= 1")
        if self.object_store_memory is not None and self.object_store_memory < 75 * 1024 * 1024:
            raise ClusterError(f"object_store_memory={self.object_store_memory!r}: Ray needs at least 75 MiB")
        if self.address is not None and self.address != "auto" and not self.address.strip():
            raise ClusterError("address is empty: use 'auto', 'ray://HOST:PORT' or leave it unset")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ClusterError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    return engine


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or ClusterError naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray without its Data library cannot run these jobs
    except ImportError as exc:
        raise ClusterError(f"--engine ray needs Ray with Ray Data, which is not installed here ({exc}); "
                           f"install the cluster extra: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(settings: RaySettings | None = None) -> Iterator[Any]:
    """Yield ``ray`` connected to an instance: the one this process already joined, else the one
    ``settings.address`` names, else a new local one. An instance this call joined or started is
    left again at the end (a local one stops); one joined before is left as it was."""
    ray = require_ray()
    settings = settings or RaySettings()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"address": settings.address, "log_to_driver": logger.isEnabledFor(logging.INFO)}
    if settings.address is None and not os.environ.get("RAY_ADDRESS"):
        # "local" always starts a new instance; address=None would join any cluster that `ray start`
        # left running on this machine, whatever its size or owner.
        kwargs.update(address="local", num_cpus=settings.num_cpus, object_store_memory=settings.object_store_memory,
                      include_dashboard=False)
    elif settings.num_cpus is not None or settings.object_store_memory is not None:
        logger.warning("num_cpus/object_store_memory size a local Ray instance; joining %s, they are ignored",
                       settings.address or os.environ.get("RAY_ADDRESS"))
    ray.init(**kwargs)
    logger.info("Ray resources: %s", ray.cluster_resources())
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ordered_execution(ray: Any) -> Iterator[None]:
    """Datasets made inside this block keep the order of their blocks in what they yield (rows come
    back in input order); a Dataset copies the context it is made in, so the earlier global
    setting is restored after the block without changing theirs."""
    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before
