"""Which sockets a set of processes listens on, for the loopback tests."""

from __future__ import annotations

import ipaddress

import psutil


def process_tree(root_pid: int) -> list[psutil.Process]:
    """The process and all its descendants (an empty list once it is gone)."""
    try:
        root = psutil.Process(root_pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def non_loopback_listeners(procs) -> list[str]:
    """'<cmd> listens on <ip>:<port>' for every listening socket of ``procs`` not on loopback."""
    bad = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN or not c.laddr:
                continue
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            if getattr(ip, "ipv4_mapped", None) is not None:  # ::ffff:127.0.0.1
                ip = ip.ipv4_mapped
            if not ip.is_loopback:
                try:
                    name = " ".join(proc.cmdline()[:3])[:120]
                except psutil.Error:
                    name = str(proc.pid)
                bad.append(f"{name} listens on {c.laddr.ip}:{c.laddr.port}")
    return bad
