"""Which sockets a set of processes listens on, for the loopback tests."""

from __future__ import annotations

import ipaddress
import threading
from typing import Optional

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


def listening_ips(procs, port: int) -> set[str]:
    """The addresses ``procs`` listen on at ``port``."""
    ips = set()
    for proc in procs:
        try:
            ips.update(c.laddr.ip for c in proc.net_connections(kind="inet")
                       if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port)
        except psutil.Error:
            continue
    return ips


class ListenerWatch:
    """While in its ``with`` block, polls the listeners of ``root_pid``'s process tree every
    ``every`` seconds: ``bad`` collects those off loopback, ``port_ips`` the addresses seen on
    ``port`` (proof that the watch saw the server it is about)."""

    def __init__(self, root_pid: int, port: Optional[int] = None, every: float = 0.5):
        self.root_pid, self.port, self.every = root_pid, port, every
        self.bad: set[str] = set()
        self.port_ips: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            tree = process_tree(self.root_pid)
            self.bad.update(non_loopback_listeners(tree))
            if self.port is not None:
                self.port_ips |= listening_ips(tree, self.port)
            self._stop.wait(self.every)

    def __enter__(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
