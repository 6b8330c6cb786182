"""Network, daemon side: a veth pair per networked child, addresses from a pool, per-child rules.

The child's own side is ``netns.py`` (``lo`` up); everything here runs in the daemon, which is the
only process that talks netlink. Verbs, in the layer shape:

* ``NetworkHost.start()`` (prepare, once): check CAP_NET_ADMIN and ``nft``, remove what a crashed
  predecessor left (its ``zg`` links in our pool, its table), install the egress ruleset
  (``zygote/_nft.py``), turn on IPv4 forwarding in the daemon's network namespace.
* ``AddressPool.acquire()`` then ``NetworkHost.attach(lease, pidfd, pid, allow)`` (outside, before
  "go"): a veth pair whose child end is created directly inside the child's namespace (cheaper
  than moving it), the child's rules, addresses, ``lo`` and the default route in the child's
  namespace; all from the daemon through the child's netns fd, no helper process.
* ``NetworkHost.detach(lease)`` then ``AddressPool.release()`` (cleanup, after reaping): the rules,
  then the veth, deleted explicitly (left to the kernel, the host end outlives the namespace).
* ``NetworkHost.close()`` at shutdown: our links and the table.

Addresses: the IPv4 pool (default 10.213.0.0/16) is cut into /30s; slot i gives the host end
``base+4i+1`` and the child ``base+4i+2``. The host end is named ``zg`` + the hex of its address
(``zg0ad50001``), unique per address, so leftovers of our pool are recognisable by name alone.

Everything here is synchronous (netlink, ``nft``); the trio daemon calls it in worker threads.
"""

from __future__ import annotations

import contextlib
import errno as E
import heapq
import ipaddress
import os
import re
import signal
import socket
import threading
from dataclasses import dataclass


from zygote_client._config import parse_allow as _parse_allow

from .. import _nft
from .._nsmaker import NetnsMaker
from . import SetupError, _sys

STEP = "network"
DEFAULT_POOL = "10.213.0.0/16"
CHILD_IFNAME = "eth0"
CAP_NET_ADMIN = 12
CLONE_NEWNET = 0x40000000
_LINK_RE = re.compile(r"^zg([0-9a-f]{8})$")

HINT_CAP = ("networked children need CAP_NET_ADMIN in the daemon's network namespace: run the daemon "
            "as root (in Docker: --cap-add NET_ADMIN); rootless networking (pasta/slirp4netns) is not "
            "supported yet")
HINT_NFT = "install the nftables package (apt-get install nftables); the egress policy needs the nft tool"


@dataclass(frozen=True)
class Lease:
    """One child's /30: the host end's address and name, the child's address."""

    slot: int
    host: str
    child: str
    ifname: str
    prefixlen: int = 30


class AddressPool:
    """Hands out /30s of an IPv4 network, lowest free first. Not thread-safe: the trio thread owns it."""

    def __init__(self, cidr: str) -> None:
        try:
            net = ipaddress.ip_network(cidr)
        except ValueError as e:
            raise ValueError(f"network pool: {e}") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"network pool: {cidr!r} is not IPv4 (IPv6 pools are not supported yet)")
        if net.prefixlen > 30:
            raise ValueError(f"network pool: {cidr!r} is smaller than one /30")
        self.network = net
        self.slots = net.num_addresses // 4
        self._next = 0
        self._free: list[int] = []
        self.in_use: set[int] = set()

    def lease(self, slot: int) -> Lease:
        base = int(self.network.network_address) + 4 * slot
        host = ipaddress.IPv4Address(base + 1)
        return Lease(slot, str(host), str(ipaddress.IPv4Address(base + 2)), f"zg{int(host):08x}")

    def acquire(self) -> Lease:
        if self._free:
            slot = heapq.heappop(self._free)
        elif self._next < self.slots:
            slot, self._next = self._next, self._next + 1
        else:
            raise SetupError(STEP, f"the address pool {self.network} is exhausted ({self.slots} children)",
                             E.EADDRNOTAVAIL, "configure a larger pool (zygote serve --network-pool CIDR)")
        self.in_use.add(slot)
        return self.lease(slot)

    def release(self, lease: Lease) -> None:
        if lease.slot in self.in_use:
            self.in_use.remove(lease.slot)
            heapq.heappush(self._free, lease.slot)

    def owns_link(self, ifname: str) -> bool:
        """Whether ``ifname`` is the host end of one of this pool's /30s."""
        m = _LINK_RE.match(ifname)
        if not m:
            return False
        addr = ipaddress.IPv4Address(int(m.group(1), 16))
        return addr in self.network and (int(addr) - int(self.network.network_address)) % 4 == 1


def parse_allow(items: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """``"CIDR[:PORT]"`` strings (validated by NetworkConfig) as (CIDR, port) pairs for IPv4."""
    out = []
    for item in items:
        net, port = _parse_allow(item)
        if net.version != 4:
            continue  # no IPv6 reaches a child at all; an IPv6 entry admits nothing
        out.append((str(net), port))
    return out


def resolv_conf(dns: tuple[str, ...]) -> bytes:
    lines = ["# generated by zygote: the daemon's --network-dns servers"]
    lines += [f"nameserver {a}" for a in dns]
    return ("\n".join(lines) + "\n").encode()


def has_cap_net_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _netlink_err(what: str, e: Exception) -> SetupError:
    code = getattr(e, "code", None) or getattr(e, "errno", None) or 0
    hint = HINT_CAP if code == E.EPERM else ""
    return SetupError(STEP, f"{what}: {os.strerror(code) if code else e}", code, hint)


def _socket_in(nsfd: int, family: int = socket.AF_NETLINK, kind: int = socket.SOCK_DGRAM,
               proto: int = socket.NETLINK_ROUTE) -> socket.socket:
    """A socket of the network namespace ``nsfd`` (by default NETLINK_ROUTE, for pyroute2).

    A socket belongs to the namespace it was created in. A short-lived thread setns()es (a
    thread's namespace is its own) and ends: no thread of the daemon is ever left in a child's
    namespace, and no helper process is needed.
    """
    def make() -> socket.socket:
        _sys.setns(nsfd, CLONE_NEWNET)
        return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)

    return _in_a_thread(make, "zygote-setns")


def _new_netns(maker: NetnsMaker) -> tuple[int, socket.socket]:
    """A new, empty network namespace from ``maker`` (owned by the maker's user namespace, not
    the host's: see zygote/_nsmaker.py): its fd and a NETLINK_ROUTE socket in it."""
    fd = maker.make()
    try:
        return fd, _socket_in(fd)
    except BaseException:
        os.close(fd)
        raise


def _in_a_thread(fn, name: str):
    """``fn()`` in a thread of its own that ends with it (its namespace changes die with it);
    what it raised is raised here."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as e:  # noqa: BLE001 - handed to the caller
            box.append(e)

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _import_pyroute2() -> None:
    """pyroute2's names for this module, imported when a NetworkHost starts (or closes): the
    import takes ~0.1 s, which a daemon whose pools have no network does not pay at its start."""
    global Conntrack, IPRoute, NetlinkError, NFCTAttrTuple
    from pyroute2 import Conntrack, IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple


class NetworkHost:
    """The daemon's side of networking: one address pool, one nft table, the veths."""

    def __init__(self, pool: str = DEFAULT_POOL, dns: tuple[str, ...] = (), masquerade: str | None = None) -> None:
        self.pool = AddressPool(pool)
        for a in dns:
            try:
                ipaddress.IPv4Address(a)
            except ValueError:
                raise ValueError(f"network dns: {a!r} is not an IPv4 address") from None
        self.dns = tuple(dns)
        self.masquerade = masquerade
        self.table = _nft.table_name(str(self.pool.network))
        self.started = False
        self._host_index: dict[str, int] = {}  # host end -> its ifindex, for prepared namespaces
        self._maker = NetnsMaker()  # (its server starts with the first namespace prepared)
        # (tests only, --test-hooks: a path; each child's rules wait until it exists, 30 s at most)
        self.pause_before_rules: str | None = None
        self.flows_per_child = _nft.FLOWS_PER_CHILD  # (tests set it lower, --test-hooks)
        self.pause_before_start: str | None = None  # (tests only: a path start() waits for)

    def start(self) -> None:
        """Check what networking needs, clear a crashed predecessor's leftovers, install the rules.

        Raises:
            SetupError: naming CAP_NET_ADMIN, nft or the failing call; networked spawns then fail.
        """
        _import_pyroute2()
        if self.pause_before_start:
            _sys.wait_for_path(self.pause_before_start)
        if not has_cap_net_admin():
            raise SetupError(STEP, "the daemon lacks CAP_NET_ADMIN", E.EPERM, HINT_CAP)
        if not _nft.available():
            raise SetupError(STEP, "nftables (the nft tool or libnftables) is missing", E.ENOENT, HINT_NFT)
        self._remove_links(self.pool.owns_link)
        try:
            _nft.apply(_nft.ruleset(self.table, dns=self.dns, masquerade=self.masquerade,
                                    flows_per_child=self.flows_per_child))
            _nft.apply(_nft.timeouts(self.table))
        except _nft.NftError as e:
            with contextlib.suppress(_nft.NftError):
                _nft.apply(_nft.delete_table(self.table))
            raise SetupError(STEP, f"installing the egress ruleset: {e}", E.EINVAL,
                             "the kernel needs nf_tables, nft_connlimit, nft_limit and conntrack timeout "
                             "policies (CONFIG_NF_CONNTRACK_TIMEOUT), and nft_nat for masquerade") from None
        try:
            # /proc/sys/net is the writer's own network namespace (the daemon's).
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
        except OSError as e:
            self.close()
            raise SetupError(STEP, f"enabling IPv4 forwarding: {e.strerror}", e.errno or 0, HINT_CAP) from None
        self.started = True

    def close(self) -> None:
        """Remove every veth of our pool still there and the table (best effort, at shutdown)."""
        _import_pyroute2()
        self.started = False
        self._maker.close()
        self._remove_links(self.pool.owns_link)
        try:
            _nft.apply(_nft.delete_table(self.table))
        except _nft.NftError:
            pass

    def attach(self, lease: Lease, pidfd: int, pid: int, allow: list[tuple[str, int | None]]) -> None:
        """Give the child ``pid`` (still waiting for "go") its veth, rules, addresses and route.

        The rules go in before either end is up, so no packet of the child ever passes unjudged.
        On failure everything done is undone and SetupError raised. ``pidfd`` is ours to close.
        """
        try:
            try:
                nsfd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise SetupError(STEP, f"opening the child's network namespace: {e.strerror}", e.errno or 0) from None
            try:
                # The pid was still ours (not reaped, so not reused) after the open: the namespace is the child's.
                signal.pidfd_send_signal(pidfd, 0)
            except ProcessLookupError:
                os.close(nsfd)
                raise SetupError(STEP, "the child died before its network was set up", E.ESRCH) from None
        finally:
            os.close(pidfd)
        rules = False
        try:
            with IPRoute() as ipr:
                _add_veth(ipr, lease, nsfd)
                self._add_rules(lease, allow)
                rules = True
                try:
                    (idx,) = ipr.link_lookup(ifname=lease.ifname)
                    ipr.addr("add", index=idx, address=lease.host, prefixlen=lease.prefixlen)
                    ipr.link("set", index=idx, state="up")
                except NetlinkError as e:
                    raise _netlink_err(f"configuring {lease.ifname}", e) from None
            _configure_inside(lambda: _socket_in(nsfd), lease, lo=False)
        except BaseException:
            self._undo(lease, allow, rules)
            raise
        finally:
            os.close(nsfd)

    def prepare(self, lease: Lease) -> int:
        """A network namespace made ahead for one child, and its fd: ``lo`` up, the child end of
        the veth (eth0) with its address and default route, the host end with its address but
        down, and no rules yet: nothing can pass until ``activate``. It is owned by the user
        namespace of the daemon's namespace maker (zygote/_nsmaker.py): the host's device
        events do not reach it, the daemon holds every capability over it, and the child that
        gets it (in a user namespace of its own) holds none at any time, not even before it
        drops privileges. A networked spawn's clone joins it instead of making its own, and the
        ~10 ms of netlink work of ``attach`` leave its path.

        Raises SetupError (whatever went wrong: out of fds, a thread that would not start, the
        maker's server, an unexpected answer), having undone its own work."""
        try:
            nsfd, sock = _new_netns(self._maker)
        except Exception as e:  # noqa: BLE001 - (out of fds, no thread: a SetupError all the same)
            code = getattr(e, "errno", 0) or 0
            raise SetupError(STEP, f"making a network namespace: {e}", code, HINT_CAP if code == E.EPERM else "") from None
        try:
            with IPRoute() as ipr:
                _add_veth(ipr, lease, nsfd)
                try:
                    (idx,) = ipr.link_lookup(ifname=lease.ifname)
                    ipr.addr("add", index=idx, address=lease.host, prefixlen=lease.prefixlen)
                except NetlinkError as e:
                    raise _netlink_err(f"configuring {lease.ifname}", e) from None
                self._host_index[lease.ifname] = idx
            sock, inside = None, sock
            _configure_inside(lambda: inside, lease, lo=True)
        except BaseException as e:
            if sock is not None:
                sock.close()
            os.close(nsfd)
            self._undo(lease, False, False)
            if isinstance(e, Exception) and not isinstance(e, SetupError):
                raise SetupError(STEP, f"preparing a network namespace: {type(e).__name__}: {e}",
                                 getattr(e, "errno", 0) or 0) from None
            raise
        return nsfd

    def intact(self, lease: Lease) -> bool:
        """Whether the host end of a namespace from ``prepare`` is still the link prepare made
        (deleting either end of a veth deletes both). One ioctl in the daemon's namespace."""
        try:
            return socket.if_nametoindex(lease.ifname) == self._host_index.get(lease.ifname)
        except OSError:
            return False

    def activate(self, lease: Lease, allow: list[tuple[str, int | None]]) -> None:
        """The rules of the child in a namespace from ``prepare`` (its clone has joined it), then
        the host end up: the first moment a packet can pass. On failure the rules are taken out
        again and SetupError raised; the veth stays, for ``detach``."""
        self._add_rules(lease, allow)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=self._host_index[lease.ifname], state="up")
        except (NetlinkError, OSError, KeyError) as e:
            with contextlib.suppress(_nft.NftError, OSError):
                _nft.apply(_nft.child_del(self.table, lease.ifname, lease.child, bool(allow)))
            raise _netlink_err(f"bringing {lease.ifname} up", e) from None

    def _add_rules(self, lease: Lease, allow: list[tuple[str, int | None]]) -> None:
        if self.pause_before_rules:  # (a test looks at the child's namespace meanwhile)
            _sys.wait_for_path(self.pause_before_rules)
        try:
            _nft.apply(_nft.child_add(self.table, lease.ifname, lease.child, allow))
        except _nft.NftError as e:
            raise SetupError(STEP, f"adding the child's firewall rules: {e}", E.EINVAL) from None

    def detach(self, lease: Lease, has_allow: bool) -> None:
        """Remove the child's rules and its veth (after reaping). Best effort: never raises."""
        self._undo(lease, has_allow, True)

    def _undo(self, lease: Lease, has_allow, rules: bool) -> None:
        # The veth first: while its host end is up but out of the rules' sets, the rules would
        # not know it. Then the rules, then the address's tracked flows.
        self._host_index.pop(lease.ifname, None)
        try:
            with IPRoute() as ipr:
                ipr.link("del", ifname=lease.ifname)  # (either end deletes the pair)
        except (NetlinkError, OSError):
            pass  # never made, or gone already (its namespace went first)
        if rules:
            try:
                _nft.apply(_nft.child_del(self.table, lease.ifname, lease.child, bool(has_allow)))
            except (_nft.NftError, OSError):
                pass  # the table is gone (shutdown) or the elements never got in
        _forget_flows(lease.child)

    @staticmethod
    def _remove_links(match) -> None:
        try:
            with IPRoute() as ipr:
                for link in ipr.get_links():
                    if match(link.get_attr("IFLA_IFNAME") or ""):
                        _delete_link(ipr, link["index"])
        except (NetlinkError, OSError):
            pass


def _forget_flows(address: str) -> None:
    """Delete the connection-tracking entries of flows ``address`` started. The forward rule lets
    traffic to a child in on conntrack state alone, and the address goes to the next child: a
    peer that kept sending on an old flow would reach that child, whatever its allow list. Best
    effort: never raises."""
    try:
        # The dump walks the whole table (~12 ms at 262144 buckets, empty or not): skipped when
        # the daemon's namespace tracks no flow at all. Called once the veth is gone, so none of
        # this address can start after the look.
        with open("/proc/sys/net/netfilter/nf_conntrack_count", "rb") as f:
            if int(f.read()) == 0:
                return
    except (OSError, ValueError):
        pass  # (conntrack not loaded yet, or unreadable: dump as before)
    try:
        with contextlib.closing(Conntrack()) as ct:
            for entry in list(ct.dump_entries(tuple_orig=NFCTAttrTuple(family=socket.AF_INET, saddr=address))):
                with contextlib.suppress(NetlinkError, OSError):  # (expired meanwhile)
                    ct.delete(entry)
    except (NetlinkError, OSError):
        pass


def _add_veth(ipr: IPRoute, lease: Lease, nsfd: int) -> None:
    """The veth pair: the host end here, the child end (eth0) made inside namespace ``nsfd``."""
    try:
        ipr.link("add", ifname=lease.ifname, kind="veth", peer={"ifname": CHILD_IFNAME, "net_ns_fd": nsfd})
    except NetlinkError as e:
        raise _netlink_err(f"creating the veth {lease.ifname}", e) from None


def _configure_inside(get_sock, lease: Lease, lo: bool) -> None:
    """Through ``get_sock()`` (a NETLINK_ROUTE socket in the child's namespace; closed here):
    eth0's address, eth0 up, the default route; ``lo`` up first when asked (a clone-made
    namespace's child brings its own up)."""
    try:
        with IPRoute(use_socket=get_sock()) as inner:
            if lo:
                inner.link("set", index=1, state="up")  # lo: index 1 in every new namespace
            (idx,) = inner.link_lookup(ifname=CHILD_IFNAME)
            inner.addr("add", index=idx, address=lease.child, prefixlen=lease.prefixlen)
            inner.link("set", index=idx, state="up")
            inner.route("add", dst="0.0.0.0/0", gateway=lease.host)
    except (NetlinkError, OSError) as e:
        raise _netlink_err("configuring the child's side of the veth", e) from None


def _delete_link(ipr: IPRoute, idx: int) -> None:
    """Delete one link; deleting either end of a veth deletes the pair."""
    try:
        ipr.link("del", index=idx)
    except NetlinkError:
        pass  # gone already (its namespace went first) or going
