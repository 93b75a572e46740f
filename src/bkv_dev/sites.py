"""The network of a fleet with sites (`bkv dev up --sites N`, root only):
network namespaces on a bridge, and the faults the tests put on its links."""

from __future__ import annotations

import os
import shutil
import subprocess

from bkv_dev.procs import FleetError


class NetemUnavailable(FleetError):
    """The kernel cannot delay or drop packets with tc netem."""


def bridge_forwarding(bridge: str, allow: bool) -> None:
    """Let traffic through a bridge of ours even where the host's firewall
    forwards nothing by default: Docker sets the FORWARD policy to DROP and
    loads br_netfilter, after which frames between two ports of one bridge
    pass iptables too -- and our namespaces could no longer reach each other.
    A no-op without iptables (nothing there drops them either)."""
    if not shutil.which("iptables"):
        return
    for direction in ("-i", "-o"):
        rule = ["FORWARD", direction, bridge, "-m", "comment", "--comment", "bkv-netns", "-j", "ACCEPT"]
        present = subprocess.run(["iptables", "-C", *rule], capture_output=True).returncode == 0
        if allow and not present:
            subprocess.run(["iptables", "-I", *rule], capture_output=True)
        elif not allow and present:
            subprocess.run(["iptables", "-D", *rule], capture_output=True)


class Sites:
    """The network of a fleet with sites: a bridge in the root namespace and
    one namespace per site joined to it by a veth pair. Faults act on the
    links: a site cut off (both ends down) or every link slowed (tc netem)."""

    def __init__(self, base_port: int, n: int) -> None:
        self.n = n
        tag = base_port // 10
        self.bridge = f"bkvb{tag}"
        self.prefix = f"10.{200 + tag // 250 % 50}.{tag % 250}"
        self.gateway = f"{self.prefix}.1"

    def ns(self, i: int) -> str:
        return f"{self.bridge}-s{i}"

    def ip(self, i: int) -> str:
        return f"{self.prefix}.{10 + i}"

    def host_if(self, i: int) -> str:
        return f"{self.bridge}v{i}"

    @staticmethod
    def _ip(*args: str, ns: str | None = None, check: bool = True) -> None:
        argv = (["ip", "netns", "exec", ns] if ns else []) + list(args)
        res = subprocess.run(argv, capture_output=True, text=True)
        if check and res.returncode:
            raise FleetError(f"{' '.join(argv)}: {res.stderr.strip()}")

    def exists(self) -> bool:
        return subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode == 0

    def up(self) -> None:
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise FleetError("--sites needs root and iproute2 (network namespaces)")
        if self.exists():
            return
        self._ip("ip", "link", "add", self.bridge, "type", "bridge")
        self._ip("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        self._ip("ip", "link", "set", self.bridge, "up")
        bridge_forwarding(self.bridge, True)
        for i in range(self.n):
            ns, peer = self.ns(i), f"{self.bridge}p{i}"
            self._ip("ip", "netns", "add", ns)
            self._ip("ip", "link", "add", self.host_if(i), "type", "veth", "peer", "name", peer)
            self._ip("ip", "link", "set", peer, "netns", ns)
            self._ip("ip", "link", "set", peer, "name", "eth0", ns=ns)
            self._ip("ip", "addr", "add", f"{self.ip(i)}/24", "dev", "eth0", ns=ns)
            for dev in ("eth0", "lo"):
                self._ip("ip", "link", "set", dev, "up", ns=ns)
            self._ip("ip", "route", "add", "default", "via", self.gateway, ns=ns)
            self._ip("ip", "link", "set", self.host_if(i), "master", self.bridge)
            self._ip("ip", "link", "set", self.host_if(i), "up")

    def down(self) -> None:
        for i in range(self.n):
            self._ip("ip", "netns", "del", self.ns(i), check=False)
        self._ip("ip", "link", "del", self.bridge, check=False)
        bridge_forwarding(self.bridge, False)

    def cut(self, i: int) -> None:
        """Site i loses its link: nothing goes in or out."""
        self._ip("ip", "link", "set", self.host_if(i), "down")
        self._ip("ip", "link", "set", "eth0", "down", ns=self.ns(i))

    def heal(self, i: int) -> None:
        self._ip("ip", "link", "set", "eth0", "up", ns=self.ns(i))
        self._ip("ip", "route", "replace", "default", "via", self.gateway, ns=self.ns(i))
        self._ip("ip", "link", "set", self.host_if(i), "up")

    def slow(self, delay_ms: int, loss_pct: float) -> None:
        """Every link delayed and lossy (tc netem). A packet between two sites
        crosses two links (site -> bridge -> site), so each end gets half the
        delay and about half the loss. Raises :class:`NetemUnavailable` on a
        kernel without sch_netem."""
        for i in range(self.n):
            for dev, ns in ((self.host_if(i), None), ("eth0", self.ns(i))):
                try:
                    self._ip("tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{delay_ms / 2:g}ms",
                             "loss", f"{loss_pct / 2:g}%", ns=ns)
                except FleetError as exc:
                    if "unknown" in str(exc).lower():
                        raise NetemUnavailable("this kernel has no sch_netem (tc netem)") from None
                    raise

    def throttle(self, rate_kbit: int, queue_ms: int) -> None:
        """Every link rate-limited with a short queue (tc tbf): packets wait,
        and drop when the queue is full. For kernels without netem."""
        for i in range(self.n):
            for dev, ns in ((self.host_if(i), None), ("eth0", self.ns(i))):
                self._ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_kbit}kbit",
                         "burst", "4kb", "latency", f"{queue_ms}ms", ns=ns)

    def unslow(self) -> None:
        for i in range(self.n):
            for dev, ns in ((self.host_if(i), None), ("eth0", self.ns(i))):
                self._ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
