"""Attach a stage's driver to the right Ray cluster, or fail fast saying why.

Every ``jobs/<stage>.py`` calls :func:`connect_ray` with its config's address. The address means:

* ``auto``: ``RAY_ADDRESS`` when set (``ray job submit`` sets it for the job's driver), else the
  address the last ``ray start`` on this machine recorded; no guessing beyond those two.
* ``local``: a private single-node instance on 127.0.0.1 with its own temp dir, stopped with the process.
* ``host:port``: that cluster's GCS.

Before ``ray.init`` the address is probed with a plain TCP connect, so a stale or foreign address
fails within seconds with a message that names it and where it came from, instead of hanging.
A loopback head is reached on loopback: Ray would otherwise rewrite ``127.0.0.1`` to the machine's
interface address, where a head started with ``--node-ip-address=127.0.0.1`` does not listen.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PROBE_TIMEOUT_S = 5.0


class RayConnectionError(RuntimeError):
    """No usable Ray cluster at the address a stage was given; the message says what to do."""


@dataclass(frozen=True)
class RayTarget:
    """Where a driver will connect: ``address`` (``host:port``, ``ray://...`` or ``local``) and its ``source``."""

    address: str
    source: str

    @property
    def host_port(self) -> tuple[str, int] | None:
        """``(host, port)`` of a GCS address; ``None`` for ``local`` and Ray client (``ray://``) addresses."""
        if self.address == "local" or "://" in self.address:
            return None
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit():
            raise RayConnectionError(f"Ray address {self.address!r} (from {self.source}) is not host:port")
        return host.strip("[]"), int(port)

    @property
    def is_loopback(self) -> bool:
        """Whether the cluster is on this machine's loopback interface."""
        hp = self.host_port
        return hp is not None and hp[0] in LOOPBACK_HOSTS


def ray_address_file() -> Path:
    """Where ``ray start`` records the address of the last head it started on this machine."""
    # Ray's own rule (ray._common.utils.get_default_system_temp_dir), kept here to avoid a private import.
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp) / "ray" / "ray_current_cluster"


def resolve_ray_address(address: str) -> RayTarget:
    """The cluster ``address`` names (see the module docstring), without connecting."""
    address = (address or "auto").strip()
    if address != "auto":
        return RayTarget(address, "the stage config")
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        if env.startswith(("http://", "https://")):
            raise RayConnectionError(
                f"RAY_ADDRESS={env} is a dashboard URL (what `ray job submit` takes); a driver needs the "
                "cluster's GCS address host:port (default port 6379), e.g. RAY_ADDRESS=127.0.0.1:6379"
            )
        return RayTarget(env, "RAY_ADDRESS")
    recorded = ray_address_file()
    if recorded.is_file() and recorded.read_text().strip():
        return RayTarget(recorded.read_text().strip(), f"{recorded}, written by the last `ray start` here")
    raise RayConnectionError(
        "no Ray cluster to attach to: RAY_ADDRESS is not set and no `ray start` recorded one. Submit the "
        "stage with `ray job submit`, set RAY_ADDRESS=host:port, or pass ray_address=local (or ray.address="
        "local) for a private single-node instance"
    )


def probe(target: RayTarget, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`RayConnectionError` unless something accepts TCP connections at ``target``."""
    hp = target.host_port
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        raise RayConnectionError(
            f"the Ray cluster at {target.address} (from {target.source}) does not answer ({e}). Is its head "
            "running? A stale address? Set RAY_ADDRESS to a live head, or pass ray_address=local"
        ) from None


def _reach_loopback_on_loopback() -> None:
    # Ray rewrites a loopback bootstrap address to the interface address unless "clusters" are off;
    # the switch is read when Ray's constants are imported, so set both the variable and the constant.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(address: str, *, log_prefix: str = "[ray]") -> str:
    """Attach to the cluster ``address`` names (unless already attached) and print where; returns the GCS address."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    target = resolve_ray_address(address)
    if target.address == "local":
        context = ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=short_temp_dir("sar-local-"),
        )
    else:
        probe(target)
        kwargs = {}
        if target.is_loopback:
            _reach_loopback_on_loopback()
            kwargs["_node_ip_address"] = "127.0.0.1"
        context = ray.init(address=target.address, **kwargs)
    gcs = context.address_info.get("gcs_address", target.address)
    resources = ray.cluster_resources()
    print(
        f"{log_prefix} connected to {gcs} (from {target.source}): {len(ray.nodes())} node(s), "
        f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU",
        flush=True,
    )
    return gcs


def short_temp_dir(prefix: str) -> str:
    """A new private directory for a Ray instance under the user's temp dir.

    Ray puts Unix sockets inside its temp dir, and their paths must stay under ~107 bytes: when
    ``TMPDIR`` is long, the directory goes under ``/tmp`` instead.
    """
    base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix=prefix, dir=base if len(base) <= 40 else "/tmp")
