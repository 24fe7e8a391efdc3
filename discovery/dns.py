"""A small DNS client for the cluster zone: A look-ups and the membership SRV view.

The agent asks CoreDNS directly (not the system resolver) so that it sees
exactly what etcd holds, with its own deadline, and can tell "this peer has
not registered yet" (NXDOMAIN: an empty answer) from "the name server is
broken" (SERVFAIL, REFUSED: an error) from "nobody answered" (a timeout).

Membership is read with ONE query: the SRV view ``_tensorflow._tcp.<zone>``
(see records.py) answers one SRV record per member, with the member's port,
and CoreDNS adds each member's address as a glue A record. Queries go over
UDP with an EDNS0 buffer of 4096 bytes (65000 to a server on a loopback
address, such as the instance's own CoreDNS). When the caller knows how many
members to expect and their answer cannot fit (``fits_udp``), the question
goes straight to TCP, so every look-up is one query; otherwise a truncated
UDP answer (TC bit) is asked again over TCP. A TCP answer holds at most
64 KiB: about 700 members with their glue (CoreDNS 1.14).
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal

import dnslib

from tfcluster.discovery import records
from tfcluster.discovery.records import Member

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0
EDNS_BUFFER = 4096
# A name server on a loopback address (each instance's own CoreDNS) is asked
# with the largest UDP buffer: loopback carries 64 KiB datagrams without
# fragmenting, so even a 256-member answer (about 20 KB) comes in one UDP
# reply, without a TCP handshake.
EDNS_BUFFER_LOOPBACK = 65000
_TCP_LENGTH = struct.Struct("!H")
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_SRV_FIXED = struct.Struct("!HHH")
# Bounds on the membership answer's size as tfzone packs it (compressed
# names): the header, question and OPT record, then per member one SRV
# record and one glue A record (77 bytes measured with dig at 64 members,
# room left for long labels). A server that packs more loosely still gets
# a truncated UDP answer followed by TCP: a second query, never a wrong one.
# The tfzone plugin's EDNS0 option (local use range): "hold this question
# until at least N records are at or below its name, at most T ms" (two
# uint32, big endian); see coredns/tfzone. Other servers ignore it.
MEMBERS_OPTION = 65002
INTERRUPT_SLICE = 0.05
"""Seconds between looks at ``interrupt`` while a reply is awaited."""
_ANSWER_OVERHEAD = 96
_BYTES_PER_MEMBER = 96


def fits_udp(edns_buffer: int | None, members: int) -> bool:
    """Whether a membership answer of ``members`` members surely fits in one
    UDP reply (512 bytes without EDNS0)."""
    limit = edns_buffer if edns_buffer is not None else 512
    return _ANSWER_OVERHEAD + _BYTES_PER_MEMBER * members <= limit


class DNSQueryError(Exception):
    """A DNS query did not produce an answer."""


class DNSTimeout(DNSQueryError):
    """No answer before the deadline: the server may be down or overloaded; retry later."""


class DNSServerError(DNSQueryError):
    """The server answered with an error code (SERVFAIL, REFUSED, ...), e.g. etcd is
    unreachable from CoreDNS or the name is outside the zones it serves."""

    def __init__(self, name: str, qtype: str, rcode: str) -> None:
        super().__init__(f"{qtype} {name}: server answered {rcode}")
        self.rcode = rcode


class DNSConnectionError(DNSQueryError):
    """The server could not be reached (connection refused, network unreachable)."""


class DNSAnswerTooLarge(DNSQueryError):
    """Even the TCP answer was truncated (a DNS message holds at most 64 KiB: about
    700 members in the SRV view); using part of it would drop members."""


class DNSBadReply(DNSQueryError):
    """The reply could not be parsed or does not answer the question asked."""


@dataclass(frozen=True)
class Endpoint:
    """Where a member's TensorFlow server listens."""

    host_ip: str
    port: int


class DNSClient:
    """Queries one name server, each query bounded by ``timeout`` seconds in all
    (the UDP attempt and a TCP retry share it).

    ``queries_sent`` counts the messages sent to the server (a truncated UDP
    answer followed by the TCP retry counts two) and ``tcp_retries`` the TCP
    retries, so that a benchmark can relate load on CoreDNS to look-ups made.
    A name whose answer once came back truncated is asked over TCP directly
    from then on: a large cluster's SRV set never fits in UDP, and asking
    twice would make CoreDNS build it twice.
    """

    def __init__(
        self,
        server: tuple[str, int],
        timeout: float = DEFAULT_TIMEOUT,
        edns_buffer: int | Literal["auto"] | None = "auto",
    ) -> None:
        self.server = server
        self.timeout = timeout
        if edns_buffer == "auto":
            edns_buffer = EDNS_BUFFER_LOOPBACK if _is_loopback(server[0]) else EDNS_BUFFER
        self.edns_buffer: int | None = edns_buffer
        self.queries_sent = 0
        self.tcp_retries = 0
        self._tcp_names: set[tuple[str, str]] = set()

    def query(self, name: str, qtype: str, tcp: bool = False) -> dnslib.DNSRecord:
        """Ask ``qtype`` (e.g. "A", "SRV") for ``name``; NXDOMAIN is an answer
        with no records, any other error code raises DNSServerError. ``tcp``
        asks over TCP at once (an answer known not to fit in UDP)."""
        packet = self.ask_raw(name, qtype, tcp)
        try:
            reply = dnslib.DNSRecord.parse(packet)
        except dnslib.DNSError as exc:
            raise DNSBadReply(f"{qtype} {name}: unparseable reply: {exc}") from exc
        rcode = dnslib.RCODE.get(reply.header.rcode)
        if rcode not in ("NOERROR", "NXDOMAIN"):
            raise DNSServerError(name, qtype, str(rcode))
        return reply

    def ask_raw(
        self,
        name: str,
        qtype: str,
        tcp: bool = False,
        hold: tuple[int, float] | None = None,
        interrupt: threading.Event | None = None,
    ) -> bytes:
        """The raw reply to one question: over UDP, then TCP if truncated (or
        over TCP at once); raises DNSAnswerTooLarge if TCP truncates too.
        ``hold`` (N records, seconds) asks tfzone to answer once N records
        are at or below the name, or when the seconds are up; the question's
        time bound grows by those seconds. ``interrupt``, once set, ends the
        wait for the reply with InterruptedError (within 50 ms)."""
        deadline = time.monotonic() + self.timeout + (hold[1] if hold else 0.0)
        request = dnslib.DNSRecord.question(name, qtype)
        if self.edns_buffer is not None or hold:
            opts = []
            if hold:
                wanted, seconds = hold
                data = struct.pack("!II", wanted, round(seconds * 1000))
                opts.append(dnslib.EDNSOption(MEMBERS_OPTION, data))
            request.add_ar(dnslib.EDNS0(udp_len=self.edns_buffer or 512, opts=opts))
        if tcp or (name, qtype) in self._tcp_names:
            packet = self._exchange_tcp(request, deadline, interrupt)
        else:
            packet = self._exchange_udp(request, deadline, interrupt)
            if _truncated(packet):
                log.debug("%s %s: truncated over UDP, asking over TCP", qtype, name)
                self.tcp_retries += 1
                self._tcp_names.add((name, qtype))
                packet = self._exchange_tcp(request, deadline, interrupt)
        if _truncated(packet):
            raise DNSAnswerTooLarge(f"{qtype} {name}: the answer exceeds 64 KiB even over TCP")
        return packet

    def resolve_a(self, name: str) -> list[str]:
        """The IPv4 addresses of ``name``; empty when the name does not exist."""
        reply = self.query(name, "A")
        return [str(rr.rdata) for rr in reply.rr if rr.rtype == dnslib.QTYPE.A]

    def members(
        self,
        zone: str,
        expected: int | None = None,
        hold: float = 0.0,
        interrupt: threading.Event | None = None,
    ) -> dict[Member, Endpoint]:
        """Every registered member of the cluster, from one SRV query, sorted.

        ``expected`` (the cluster's size, when known) sends the query over
        TCP at once if that many members cannot fit in a UDP answer; with
        ``hold`` seconds too, tfzone holds the question until that many
        members are registered (or the seconds are up), so one question
        waits for the last claim (``interrupt`` ends that wait early). SRV
        targets that are not member names, and targets without a glue
        address, are skipped: they are not servers TensorFlow can dial.
        """
        tcp = expected is not None and not fits_udp(self.edns_buffer, expected)
        name = records.srv_name(zone)
        held = (expected, hold) if expected and hold > 0 else None
        return members_from_reply(self.ask_raw(name, "SRV", tcp, held, interrupt), name)

    def _exchange_udp(
        self, request: dnslib.DNSRecord, deadline: float, interrupt: threading.Event | None
    ) -> bytes:
        with socket.socket(_family(self.server[0]), socket.SOCK_DGRAM) as sock:
            try:
                # Connected: the kernel drops datagrams from other sources and
                # reports ICMP port-unreachable as ConnectionRefusedError.
                sock.connect(self.server)
                sock.settimeout(_remaining(deadline))
                sock.send(request.pack())
                self.queries_sent += 1
                while True:
                    _readable(sock, deadline, interrupt)
                    packet = sock.recv(65535)
                    if _answers(packet, request):
                        return packet
            except TimeoutError:
                raise _timeout(request, self.server) from None
            except InterruptedError:
                raise
            except OSError as exc:
                raise DNSConnectionError(f"{_describe(request)} via {self.server}: {exc}") from exc

    def _exchange_tcp(
        self, request: dnslib.DNSRecord, deadline: float, interrupt: threading.Event | None
    ) -> bytes:
        packet = request.pack()
        try:
            with socket.create_connection(self.server, timeout=_remaining(deadline)) as sock:
                sock.sendall(_TCP_LENGTH.pack(len(packet)) + packet)
                self.queries_sent += 1
                head = _recv_exactly(sock, 2, deadline, request, interrupt)
                (length,) = _TCP_LENGTH.unpack(head)
                packet = _recv_exactly(sock, length, deadline, request, interrupt)
        except TimeoutError:
            raise _timeout(request, self.server) from None
        except InterruptedError:
            raise
        except OSError as exc:
            raise DNSConnectionError(f"{_describe(request)} via {self.server}: {exc}") from exc
        if not _answers(packet, request):
            raise DNSBadReply(f"{_describe(request)}: TCP reply does not match the question")
        return packet


def query(
    server: tuple[str, int], name: str, qtype: str, timeout: float = DEFAULT_TIMEOUT
) -> dnslib.DNSRecord:
    """One query with a fresh client; see DNSClient.query."""
    return DNSClient(server, timeout).query(name, qtype)


def resolve_a(server: tuple[str, int], name: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """See DNSClient.resolve_a."""
    return DNSClient(server, timeout).resolve_a(name)


def members(
    server: tuple[str, int], zone: str, timeout: float = DEFAULT_TIMEOUT
) -> dict[Member, Endpoint]:
    """See DNSClient.members."""
    return DNSClient(server, timeout).members(zone)


def parse_server(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` -> ("127.0.0.1", 5353), ``"[::1]:5353"`` -> ("::1", 5353);
    the port defaults to 53."""
    if text.count(":") > 1 and not text.startswith("["):
        return text, 53  # a bare IPv6 address
    host, sep, port = text.rpartition(":")
    if not sep:
        return text.strip("[]"), 53
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad DNS server address {text!r}: expected host:port")
    return host.strip("[]"), int(port)


def members_from_reply(packet: bytes, name: str = "membership") -> dict[Member, Endpoint]:
    """The members a membership SRV reply lists, sorted; see DNSClient.members."""
    try:
        rcode, srv, glue = parse_membership(packet)
    except (IndexError, ValueError, struct.error) as exc:
        raise DNSBadReply(f"SRV {name}: unparseable reply: {exc}") from exc
    if rcode not in (0, 3):  # NOERROR, NXDOMAIN
        raise DNSServerError(name, "SRV", str(dnslib.RCODE.get(rcode)))
    found: dict[Member, Endpoint] = {}
    for target, port in srv:
        member = records.parse_label(target.partition(".")[0])
        address = glue.get(target)
        if member is None or address is None:
            log.debug("SRV target %s is not a member with an address; skipped", target)
            continue
        found.setdefault(member, Endpoint(address, port))
    return dict(sorted(found.items()))


def _answers(packet: bytes, request: dnslib.DNSRecord) -> bool:
    """Whether ``packet`` is a reply to ``request`` (same id, QR set, same
    question); False for a stray datagram."""
    if len(packet) < _HEADER.size:
        return False
    ident, flags, qdcount, *_ = _HEADER.unpack_from(packet)
    if ident != request.header.id or not flags & 0x8000:
        return False
    if qdcount == 0:
        return True
    # The question follows the header, uncompressed, in the request as in the reply.
    start = _HEADER.size
    question = request.pack()[start:]
    question = question[: _name_length(question, 0) + 4]
    return packet[start : start + len(question)].lower() == question.lower()


def _truncated(packet: bytes) -> bool:
    return bool(packet[2] & 0x02)


def parse_membership(packet: bytes) -> tuple[int, list[tuple[str, int]], dict[str, str]]:
    """(rcode, [(SRV target, port)], {name: IPv4 glue}) from a reply, names in
    lower case without the final dot.

    A reader for just what the membership answer holds: a general DNS parser
    (dnslib) takes about 25 ms for a 256-member answer, this about 4 ms.
    """
    _ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(packet)
    offset = _HEADER.size
    names: dict[int, str] = {}
    for _ in range(qdcount):
        _name, offset = _read_name(packet, offset, names)
        offset += 4
    srv: list[tuple[str, int]] = []
    glue: dict[str, str] = {}
    for index in range(ancount + nscount + arcount):
        owner, offset = _read_name(packet, offset, names)
        rtype, _rclass, _ttl, rdlength = _RR_FIXED.unpack_from(packet, offset)
        offset += _RR_FIXED.size
        if rtype == 33 and index < ancount:  # SRV
            _priority, _weight, port = _SRV_FIXED.unpack_from(packet, offset)
            target, _ = _read_name(packet, offset + _SRV_FIXED.size, names)
            srv.append((target, port))
        elif rtype == 1 and rdlength == 4 and index >= ancount + nscount:  # glue A
            glue.setdefault(owner, socket.inet_ntoa(packet[offset : offset + 4]))
        offset += rdlength
    if offset > len(packet):
        raise ValueError("reply ends inside a record")
    return flags & 0x0F, srv, glue


def _read_name(packet: bytes, offset: int, names: dict[int, str]) -> tuple[str, int]:
    """The name at ``offset`` (following compression pointers) and the offset
    after it. ``names`` caches names by the offset they start at."""
    start = offset
    labels: list[str] = []
    end = -1
    for _ in range(128):  # more hops than a 64 KiB message can need: a loop
        cached = names.get(offset)
        if cached is not None:
            labels.append(cached)
            if end < 0:
                end = offset + _name_length(packet, offset)
            break
        length = packet[offset]
        if length >= 0xC0:
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | packet[offset + 1]
            continue
        if length == 0:
            if end < 0:
                end = offset + 1
            break
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace").lower())
        offset += 1 + length
    else:
        raise ValueError("compression pointer loop")
    name = ".".join(label for label in labels if label)
    names[start] = name
    return name, end


def _name_length(packet: bytes, offset: int) -> int:
    """Bytes the name at ``offset`` occupies in place (up to its first pointer)."""
    start = offset
    while True:
        length = packet[offset]
        if length >= 0xC0:
            return offset + 2 - start
        if length == 0:
            return offset + 1 - start
        offset += 1 + length


def _recv_exactly(
    sock: socket.socket,
    size: int,
    deadline: float,
    request: dnslib.DNSRecord,
    interrupt: threading.Event | None,
) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        _readable(sock, deadline, interrupt)
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise DNSBadReply(f"{_describe(request)}: server closed the TCP connection")
        chunks += chunk
    return bytes(chunks)


def _readable(sock: socket.socket, deadline: float, interrupt: threading.Event | None) -> None:
    """Set the socket's timeout for the next read: the time left, or with
    ``interrupt``, waits in 50 ms slices until the socket has data (a held
    question can take seconds), raising InterruptedError once it is set."""
    if interrupt is None:
        sock.settimeout(_remaining(deadline))
        return
    while not select.select([sock], [], [], min(_remaining(deadline), INTERRUPT_SLICE))[0]:
        if interrupt.is_set():
            raise InterruptedError("DNS question interrupted")
    sock.settimeout(_remaining(deadline))


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _timeout(request: dnslib.DNSRecord, server: tuple[str, int]) -> DNSTimeout:
    return DNSTimeout(f"{_describe(request)}: no answer from {server[0]}:{server[1]}")


def _describe(request: dnslib.DNSRecord) -> str:
    return f"{dnslib.QTYPE.get(request.q.qtype)} {request.q.qname}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
