"""The egress firewall, behind one module: nftables rules as JSON, fed to ``nft -j -f -``.

One table (family inet) per address pool, made in one atomic batch at daemon start and deleted at
shutdown. Per-child state is a few set/map elements (and a chain for a child with an allow-list),
added and removed in one small batch each, so the ruleset is never rewritten while children run::

    set links   {ifname}                  host ends of our veths
    set peers4  {ifname . ipv4_addr}      (host end, the child's address): anti-spoofing
    set dns4    {ipv4_addr}               nameservers children may query on port 53
    set deny4   {ipv4_addr interval}      private and special ranges
    map allow   {ifname : verdict}        children with an allow-list -> goto allow-<ifname>

    input:    iifname @links reject                 nothing of the host itself, any address/port
    forward:  iifname @links jump egress
              oifname @links ct state established,related accept; oifname @links drop
    egress:   not IPv4 -> drop; (iifname . saddr) not in @peers4 -> drop; a new flow past the
              child's flow or rate budget (sets flows4, rate4) -> reject; oifname @links -> reject
              (child to child); DNS -> accept; iifname vmap @allow; daddr @deny4 -> reject; accept
              (a new flow first jumps to timeouts: the children's ct timeout policies)
    postrouting (with masquerade): iifname @links oifname <uplink> masquerade

Flow budgets: the forward rules make the kernel track every flow of the daemon's namespace (the
host's own, when the daemon runs there) in one table of nf_conntrack_max entries, and a full
table drops every new flow in it. Each child may have FLOWS_PER_CHILD flows open (ct count: TCP
not yet closed, UDP and the rest until they time out) and start NEW_FLOWS_PER_SECOND (burst
NEW_FLOWS_BURST); its closed TCP flows and unanswered UDP go from the table after
CLOSED_FLOW_SECONDS instead of the kernel's 120 s and 30 s. So a child keeps at most about
FLOWS_PER_CHILD + NEW_FLOWS_PER_SECOND * CLOSED_FLOW_SECONDS entries (~3000): one child
opening and closing connections in a loop filled the whole table in under a minute (a
helper's red-team), and the host and every other child could start no flow.

Traffic to any address of the host (its uplink, the veth's host end, link-local) is routed to the
input hook, never to forward, which is why input drops everything our links send.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import shutil
import socket
import subprocess
import threading

DENY4 = (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8",       # RFC 1918
    "100.64.0.0/10",    # carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local, including the 169.254.169.254 cloud metadata service
    "172.16.0.0/12",    # RFC 1918
    "192.0.0.0/24",     # IETF protocol assignments
    "192.168.0.0/16",   # RFC 1918
    "198.18.0.0/15",    # benchmarking (RFC 2544)
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and the limited broadcast 255.255.255.255
)

_REJECT = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}

FLOWS_PER_CHILD = 2048
NEW_FLOWS_PER_SECOND = 100
NEW_FLOWS_BURST = 400
CLOSED_FLOW_SECONDS = 10
# The kernel's defaults for the rest (TCP established 5 days, UDP answered 120 s): ct count bounds them.
_TCP_TIMEOUTS = {"syn_sent": 30, "syn_recv": 30, "fin_wait": 30, "close_wait": 30, "last_ack": 30,
                 "time_wait": CLOSED_FLOW_SECONDS, "close": CLOSED_FLOW_SECONDS}
_UDP_TIMEOUTS = {"unreplied": CLOSED_FLOW_SECONDS, "replied": 120}


class NftError(Exception):
    """``nft`` refused a batch (or is missing); the message is nft's own."""


def path() -> str | None:
    """Where the ``nft`` tool is, or None."""
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


def available() -> bool:
    """Whether batches can be applied: libnftables or the ``nft`` tool is installed."""
    return _library() is not None or path() is not None


def apply(cmds: list[dict] | str) -> None:
    """Run one batch atomically (nft applies all of it or nothing): JSON commands, or a text in
    nft's own syntax (the library tries JSON first, then its syntax; the tool is told which:
    given -j, nft 1.0.6 read a text batch from stdin as JSON, then parsed nothing and exited 0).

    Through libnftables (the library the ``nft`` tool is a front end of) when it loads: a
    networked spawn applies two batches, and starting ``nft`` for each cost ~2.5 ms of the
    spawn's path. The tool is the fallback."""
    text = cmds if isinstance(cmds, str) else json.dumps({"nftables": cmds})
    lib = _library()
    if lib is not None:
        lib.run(text)
        return
    exe = path()
    if exe is None:
        raise NftError("the nft tool is not installed")
    p = subprocess.run([exe, *(() if isinstance(cmds, str) else ("-j",)), "-f", "-"], input=text.encode(),
                       capture_output=True)
    if p.returncode != 0:
        raise NftError(p.stderr.decode(errors="replace").strip() or f"nft exited {p.returncode}")


_NFT_CTX_OUTPUT_JSON = 1 << 4  # libnftables.h: JSON output, and JSON input is tried first


class _Libnftables:
    """One libnftables context (ctypes), used under a lock: callers are the daemon's threads."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            raise OSError("libnftables: cannot buffer its output")
        self._lib, self._ctx, self._lock = lib, ctx, threading.Lock()

    def run(self, text: str) -> None:
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            self._lib.nft_ctx_get_output_buffer(self._ctx)  # read (and so reset) both buffers
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace").strip()
        if rc != 0:
            raise NftError(err or f"libnftables returned {rc}")


_NETLINK_NETFILTER = 12


@functools.lru_cache(maxsize=1)
def _library() -> _Libnftables | None:
    # libnftables calls exit() when it cannot open its netfilter netlink socket (no nf_tables,
    # out of fds): in the daemon that would end every child. Only use it where that socket opens;
    # elsewhere the nft tool fails on its own, in its own process.
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER).close()
    except OSError:
        return None
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        return _Libnftables(ctypes.CDLL(name))
    except (OSError, AttributeError):  # not installed, or too old for this API
        return None


def table_name(pool: str) -> str:
    """The table of one address pool: two daemons with disjoint pools never touch each other's."""
    return "zygote-" + pool.replace("/", "-")


def _t(table: str) -> dict:
    return {"family": "inet", "table": table}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _ip(field: str) -> dict:
    return {"payload": {"protocol": "ip", "field": field}}


def _match(left, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(cidr: str):
    addr, _, plen = cidr.partition("/")
    return {"prefix": {"addr": addr, "len": int(plen)}} if plen else addr


def _rule(table: str, chain: str, *expr: dict) -> dict:
    return {"add": {"rule": {**_t(table), "chain": chain, "expr": list(expr)}}}


def _new_flow_past(table: str, budget: str, stmt: dict, op: str) -> dict:
    """A rule of egress: a new flow of a child past its budget ``stmt`` in set ``budget`` (one
    element per child address, put there by ``op``) is rejected."""
    return _rule(table, "egress", _match({"ct": {"key": "state"}}, "new", "in"),
                 {"set": {"op": op, "elem": _ip("saddr"), "set": f"@{budget}", "stmt": [stmt]}}, _REJECT)


def ruleset(table: str, *, dns: tuple[str, ...] = (), masquerade: str | None = None,
            flows_per_child: int = FLOWS_PER_CHILD) -> list[dict]:
    """The whole table as one batch; it first deletes a table of that name a crashed predecessor
    may have left ("add" then "delete" works whether or not it exists)."""
    t = _t(table)
    # (ct count counts on an "add"; a limit is kept per element only by "update", which also
    # renews the element's timeout: with "add" every new flow passed)
    budgets = [_new_flow_past(table, "flows4", {"ct count": {"val": flows_per_child, "inv": True}}, "add"),
               _new_flow_past(table, "rate4", {"limit": {"rate": NEW_FLOWS_PER_SECOND, "burst": NEW_FLOWS_BURST,
                                                         "per": "second", "inv": True}}, "update")]
    cmds: list[dict] = [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"delete": {"table": {"family": "inet", "name": table}}},
        {"add": {"table": {"family": "inet", "name": table}}},
        {"add": {"set": {**t, "name": "links", "type": "ifname"}}},
        {"add": {"set": {**t, "name": "peers4", "type": ["ifname", "ipv4_addr"]}}},
        {"add": {"set": {**t, "name": "deny4", "type": "ipv4_addr", "flags": ["interval"],
                         "elem": [_prefix(c) for c in DENY4]}}},
        {"add": {"set": {**t, "name": "dns4", "type": "ipv4_addr"}}},
        {"add": {"map": {**t, "name": "allow", "type": "ifname", "map": "verdict"}}},
        # (updated from the packet path: nft makes such sets dynamic itself; JSON has no flag for it)
        {"add": {"set": {**t, "name": "flows4", "type": "ipv4_addr"}}},
        {"add": {"set": {**t, "name": "rate4", "type": "ipv4_addr", "flags": ["timeout"], "timeout": 60}}},
        {"add": {"chain": {**t, "name": "timeouts"}}},  # (its rules: timeouts())
        {"add": {"chain": {**t, "name": "input", "type": "filter", "hook": "input", "prio": 0,
                           "policy": "accept"}}},
        {"add": {"chain": {**t, "name": "forward", "type": "filter", "hook": "forward", "prio": 0,
                           "policy": "accept"}}},
        {"add": {"chain": {**t, "name": "egress"}}},
        _rule(table, "input", _match(_meta("iifname"), "@links"), _REJECT),
        _rule(table, "forward", _match(_meta("iifname"), "@links"), {"jump": {"target": "egress"}}),
        _rule(table, "forward", _match(_meta("oifname"), "@links"),
              _match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}),
        _rule(table, "forward", _match(_meta("oifname"), "@links"), {"drop": None}),
        # IPv6 is not routed to children (no IPv6 pool): none of it leaves them.
        _rule(table, "egress", _match(_meta("nfproto"), "ipv4", "!="), {"drop": None}),
        _rule(table, "egress", _match({"concat": [_meta("iifname"), _ip("saddr")]}, "@peers4", "!="),
              {"drop": None}),
        *budgets,
        _rule(table, "egress", _match({"ct": {"key": "state"}}, "new", "in"), {"jump": {"target": "timeouts"}}),
        _rule(table, "egress", _match(_meta("oifname"), "@links"), _REJECT),
        _rule(table, "egress", _match(_ip("daddr"), "@dns4"),
              _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
              _match({"payload": {"protocol": "th", "field": "dport"}}, 53), {"accept": None}),
        _rule(table, "egress", {"vmap": {"key": _meta("iifname"), "data": "@allow"}}),
        _rule(table, "egress", _match(_ip("daddr"), "@deny4"), _REJECT),
        _rule(table, "egress", {"accept": None}),
    ]
    if dns:
        cmds.append({"add": {"element": {**t, "name": "dns4", "elem": list(dns)}}})
    if masquerade:
        cmds += [
            {"add": {"chain": {**t, "name": "postrouting", "type": "nat", "hook": "postrouting",
                               "prio": 100, "policy": "accept"}}},
            _rule(table, "postrouting", _match(_meta("iifname"), "@links"),
                  _match(_meta("oifname"), masquerade), {"masquerade": None}),
        ]
    return cmds


def timeouts(table: str) -> str:
    """The children's conntrack timeout policies and the rules of chain ``timeouts`` that give
    them to their new flows: a second batch after ``ruleset``, in nft's own syntax, since its
    JSON parser (1.0.6, Debian 12) drops a ct timeout's policy without a word. (A policy is
    given to a flow's entry once it exists, unconfirmed: in a chain after conntrack's hook, as
    egress is; in a chain before it, the kernel ignores it.)"""
    def policy(p: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in p.items())
    # (a table block adds to the table ruleset() made; its name, "zygote-" and the pool's CIDR,
    # is a plain word of nft's syntax)
    return "\n".join([
        f"table inet {table} {{",
        f"  ct timeout closed-tcp {{ protocol tcp; l3proto ip; policy = {{ {policy(_TCP_TIMEOUTS)} }}; }}",
        f"  ct timeout closed-udp {{ protocol udp; l3proto ip; policy = {{ {policy(_UDP_TIMEOUTS)} }}; }}",
        "  chain timeouts {",
        '    meta l4proto tcp ct timeout set "closed-tcp"',
        '    meta l4proto udp ct timeout set "closed-udp"',
        "  }",
        "}",
    ]) + "\n"


def child_add(table: str, ifname: str, addr: str, allow: list[tuple[str, int | None]]) -> list[dict]:
    """One child's elements (and its allow chain when it has an allow-list), as one batch.

    ``allow``: (CIDR, port or None) pairs; non-empty means only these destinations (TCP/UDP to
    the port when one is given), even inside the denied ranges; DNS stays allowed.
    """
    t = _t(table)
    cmds: list[dict] = [
        {"add": {"element": {**t, "name": "peers4", "elem": [{"concat": [ifname, addr]}]}}},
        {"add": {"element": {**t, "name": "links", "elem": [ifname]}}},
    ]
    if allow:
        chain = f"allow-{ifname}"
        cmds.append({"add": {"chain": {**t, "name": chain}}})
        for cidr, port in allow:
            expr = [_match(_ip("daddr"), _prefix(cidr))]
            if port is not None:
                expr += [_match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
                         _match({"payload": {"protocol": "th", "field": "dport"}}, port)]
            cmds.append(_rule(table, chain, *expr, {"accept": None}))
        cmds.append(_rule(table, chain, _REJECT))
        cmds.append({"add": {"element": {**t, "name": "allow", "elem": [[ifname, {"goto": {"target": chain}}]]}}})
    return cmds


def child_del(table: str, ifname: str, addr: str, has_allow: bool) -> list[dict]:
    """The inverse of child_add, as one batch."""
    t = _t(table)
    cmds: list[dict] = []
    if has_allow:
        chain = f"allow-{ifname}"
        cmds += [{"delete": {"element": {**t, "name": "allow", "elem": [ifname]}}},
                 {"flush": {"chain": {**t, "name": chain}}},
                 {"delete": {"chain": {**t, "name": chain}}}]
    cmds += [{"delete": {"element": {**t, "name": "links", "elem": [ifname]}}},
             {"delete": {"element": {**t, "name": "peers4", "elem": [{"concat": [ifname, addr]}]}}}]
    # The address's flow budgets go too (the next child with it started with what was left of
    # them). Each is there only once the child started a flow: "add" then "delete" works either way.
    for budget in ("flows4", "rate4"):
        cmds += [{"add": {"element": {**t, "name": budget, "elem": [addr]}}},
                 {"delete": {"element": {**t, "name": budget, "elem": [addr]}}}]
    return cmds


def delete_table(table: str) -> list[dict]:
    return [{"add": {"table": {"family": "inet", "name": table}}},
            {"delete": {"table": {"family": "inet", "name": table}}}]
