"""Machines emulated with network namespaces: each "pod" or "node" gets its own network namespace
with an `eth0` on a private bridge, its own /etc/hosts (so `<job>-<i>.<service>` names resolve)
and its own hostname. Needs root, `ip`, `unshare` (and `tc` for `limit_rate`); `try_network`
returns None where that is not available."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

# -- Kubernetes: rendered manifests, and a pod's environment as the kubelet builds it ---------------


def _ip_cmd() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)


def _tc_cmd() -> str | None:
    return shutil.which("tc") or next((p for p in ("/usr/sbin/tc", "/sbin/tc") if os.path.exists(p)), None)


def have_namespaces() -> str | None:
    """None if this process can build network and mount namespaces, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "network/mount namespaces need root (CI runs as root)"
    if not _ip_cmd() or not shutil.which("unshare"):
        return "needs `ip` (iproute2) and `unshare` (util-linux)"
    return None


class PodNetwork:
    """One network namespace per pod, `eth0` on a private bridge, /etc/hosts per pod."""

    def __init__(self, n: int, names: list[str]):
        self.ip = _ip_cmd()
        tag = f"{os.getpid() % 0xFFFF:04x}"
        self.bridge = f"ktb{tag}"
        self.ns = [f"kt{tag}p{i}" for i in range(n)]
        self.veth = [f"kt{tag}v{i}" for i in range(n)]  # the host side of pod i's cable
        subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.addrs = [f"{subnet}.{i + 1}" for i in range(n)]
        self.names = names  # DNS name of pod i: <job>-<i>.<service>
        self.created: list[list[str]] = []

    def _run(self, *args: str, undo: list[str] | None = None) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True, timeout=30)
        if undo:
            self.created.append(undo)

    def up(self) -> "PodNetwork":
        self._run("link", "add", self.bridge, "type", "bridge", undo=["link", "del", self.bridge])
        self._run("link", "set", self.bridge, "up")
        for ns, veth, addr in zip(self.ns, self.veth, self.addrs):
            self._run("netns", "add", ns, undo=["netns", "del", ns])
            self._run("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                      undo=["link", "del", veth])
            self._run("link", "set", veth, "master", self.bridge, "up")
            self._run("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            self._run("-n", ns, "link", "set", "eth0", "up")
            self._run("-n", ns, "link", "set", "lo", "up")
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
        for i in range(len(self.ns)):
            self.publish(i, visible_to_others=False)
        return self

    def publish(self, index: int, visible_to_others: bool = True) -> None:
        """What the headless Service's DNS answers: each pod knows itself; others once published."""
        self._published = getattr(self, "_published", set())
        if visible_to_others:
            self._published.add(index)
        for i, ns in enumerate(self.ns):
            known = sorted({i} | self._published)
            lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
            lines += [f"{self.addrs[j]} {self.names[j]} {self.names[j].split('.')[0]}" for j in known]
            # Rewrite in place: `ip netns exec` bind-mounts this file, a new inode would not show.
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write("\n".join(lines) + "\n")

    def wrap(self, index: int, cmd: list[str]) -> list[str]:
        """Run `cmd` as pod `index`: its network, its hostname, and its own PID namespace, so
        that killing the pod kills every process in it (torchrun starts its workers in new
        sessions: a process-group kill alone leaves them training). `--mount-proc` gives it the
        matching /proc, as a container has: with the host's, a process asking about its own PID
        (psutil, in DeepSpeed's CPU accelerator) finds another process or none."""
        hostname = self.hostname(index)
        return [self.ip, "netns", "exec", self.ns[index], "unshare", "--uts", "--pid", "--mount-proc", "--kill-child",
                "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *cmd]

    def host_address(self) -> str:
        """An address of this (the host's) network on the bridge, which every pod reaches: where
        a server the test starts (an S3 API) listens for the pods."""
        if not getattr(self, "_host_addr", None):
            self._host_addr = self.addrs[0].rsplit(".", 1)[0] + ".254"
            self._run("addr", "add", f"{self._host_addr}/24", "dev", self.bridge)
        return self._host_addr

    def hostname(self, index: int) -> str:
        return self.names[index].split(".")[0]

    def cut(self, index: int) -> None:
        """Pull pod `index`'s cable: its packets vanish, nobody sees a connection close."""
        self._run("link", "set", self.veth[index], "down")

    def limit_rate(self, index: int, rate: str = "8mbit") -> None:
        """A slow link into pod `index`: a token bucket on the host side of its cable (`netem`
        does not exist on these kernels; `tbf` does). Removed with the cable in `down`."""
        subprocess.run([_tc_cmd(), "qdisc", "add", "dev", self.veth[index], "root", "tbf", "rate", rate,
                        "burst", "32kbit", "latency", "400ms"], check=True, capture_output=True, timeout=30)

    def down(self) -> None:
        for undo in reversed(self.created):
            subprocess.run([self.ip, *undo], capture_output=True, timeout=30)
        for ns in self.ns:
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self.created.clear()


def try_network(n: int, names: list[str]) -> PodNetwork | None:
    """`n` pods on one bridge, every pod able to reach pod 0; None (and why, printed) if not possible."""
    if os.environ.get("K8S_RUN_LOOPBACK") or have_namespaces():
        return None  # K8S_RUN_LOOPBACK=1 forces the fallback (to test it, or where netns misbehave)
    net = PodNetwork(n, names)
    try:
        net.up()
        # Can pod 1 reach pod 0? A refused connection proves the packets got there and back.
        probe = ("import socket\ntry: socket.create_connection(('%s', 9), timeout=3)\n"
                 "except ConnectionRefusedError: print('reached')\nexcept OSError as e: print(e)") % net.addrs[0]
        out = subprocess.run([net.ip, "netns", "exec", net.ns[-1], sys.executable, "-c", probe],
                             capture_output=True, text=True, timeout=30)
        if out.stdout.strip() != "reached":
            raise OSError(f"pods cannot reach each other: {out.stdout.strip()} {out.stderr.strip()}")
        return net
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        print(f"network namespaces unavailable ({e}); using the loopback")
        net.down()
        return None


def in_mount_namespace(mounts: list[tuple[str, str]], cmd: list[str]) -> list[str]:
    """Run `cmd` with small tmpfs mounts [(size, path), ...] that only it sees (`unshare --mount`
    makes mounts private): a small /dev/shm or a nearly full volume without touching the host."""
    script = " && ".join(f"mount -t tmpfs -o size={size} tmpfs {path}" for size, path in mounts)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script + ' && exec "$@"', "sh", *cmd]


