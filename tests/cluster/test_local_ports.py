"""Ports for the project's own servers (Ray heads, Serve, the demo) come from outside the kernel's ephemeral
range, where any outgoing connection could take a port between the pick and the server's bind."""

from __future__ import annotations

import socket
from pathlib import Path

from cluster.local import SERVER_PORTS, free_port


def test_free_ports_are_bindable_and_never_in_the_ephemeral_range():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) > 40  # picked at random, not the same port again and again
    assert all(p in SERVER_PORTS and not low <= p <= high for p in ports), (ports, low, high)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_held_by_a_listener_is_never_handed_out():
    held = []
    try:
        # Hold every twentieth port of the range: none of them may come back (a free_port that did not try
        # its pick would hand one out in about 10 of 200 draws).
        for port in range(SERVER_PORTS.start, SERVER_PORTS.stop, 20):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            s.listen()
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        assert not taken & {free_port() for _ in range(200)}
    finally:
        for s in held:
            s.close()
