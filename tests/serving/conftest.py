"""Serving tests share one way to put an application on loopback: ``serve_on_loopback(app, name) -> URL``."""

from __future__ import annotations

import pytest

from cluster.local import free_port


@pytest.fixture(scope="module")
def serve_on_loopback(ray_session):
    """A function that serves a Ray Serve application on 127.0.0.1 at a free port and returns its base URL.

    What a module started is deleted, and Serve shut down, when the module's tests are done.
    """
    from ray import serve

    started: list[str] = []
    serving = False

    def run(app, name: str) -> str:
        nonlocal serving
        port = free_port()
        serving = True
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=name, route_prefix="/")
        started.append(name)
        return f"http://127.0.0.1:{port}"

    yield run
    for name in started:
        serve.delete(name)
    # Shut Serve down even when no application came up: a Serve left running keeps its HTTP options, and
    # the next module's serve.start would inherit them (a port that failed to bind once failed every test).
    if serving:
        serve.shutdown()
