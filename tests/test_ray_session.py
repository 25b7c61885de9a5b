"""The session's local Ray instance is private and on loopback."""

from __future__ import annotations


def test_ray_session_is_local_and_loopback(ray_session):
    ray = ray_session

    @ray.remote
    def where() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(where.remote()) == "127.0.0.1"
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    assert ray.cluster_resources()["CPU"] == 4
