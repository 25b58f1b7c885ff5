"""What nDPI found of a flow that NFStream does not hand over, read from nDPI's own flow structure.

NFStream 6.6 keeps nDPI's flow structure (struct nf_flow's ``ndpi_flow``, a struct ndpi_flow_struct) from the
flow's first packet until the flow is freed (meter_free_flow), after the dissection and the give-up of
meter_expire_flow: the meter reads it there once per flow (MeterConfig.ndpi_facts), through the engine's cffi
declarations, with nothing per packet. NFStream itself copies only the application, SNI, fingerprints, user
agent and content type out of it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

MAX_RISK_INFOS = 8  # the size of ndpi_flow_struct's risk_infos


class NdpiFacts(NamedTuple):
    """What nDPI found of a flow that NFStream does not hand over (see the module's docstring)."""

    risk: int  # nDPI's risk bitmap: bit n set for ndpi_risk_enum n (NDPI_CLEAR_TEXT_CREDENTIALS is 36)
    risk_info: tuple[tuple[int, str], ...]  # (risk, nDPI's words about it: "Found FTP username (anonymous)")
    # what names software: ("http_server", "Boa/0.94.14rc21"), ("ssdp_server", ...), ("ssdp_user_agent", ...),
    # ("ssh_server", "SSH-2.0-dropbear_2014.63"), ("ssh_client", ...)
    texts: tuple[tuple[str, str], ...]
    handshake: int  # TCP, as nDPI tracked it: bit 0 the initiator's SYN, bit 1 the responder's SYN-ACK


# A TCP flow whose handshake nDPI saw whole, or another flow, with neither risks nor texts: read_ndpi_facts gives
# None for these (most flows), which then cost nothing to send; NOTHING_OF_NOTE says what None stands for.
ACCEPTED_TCP = NdpiFacts(0, (), (), 3)
NOTHING = NdpiFacts(0, (), (), 0)


def nothing_of_note(protocol: int) -> NdpiFacts:
    """What a flow's facts of None stand for."""
    return ACCEPTED_TCP if protocol == 6 else NOTHING


def _text(ffi: Any, pointer: Any) -> str:
    return ffi.string(pointer).decode("utf-8", errors="replace") if pointer != ffi.NULL else ""


def _texts(ffi: Any, nd: Any, protocol: str) -> tuple[tuple[str, str], ...]:
    """The texts naming software, of the detected protocol's part of nDPI's structure (its per-protocol data is a
    union: only the detected protocol's member may be read)."""
    texts = []
    if protocol == "HTTP":
        server = _text(ffi, nd.http.server)
        if server:
            texts.append(("http_server", server))
    elif protocol == "SSDP":
        for name, pointer in (("ssdp_server", nd.protos.ssdp.server), ("ssdp_user_agent", nd.protos.ssdp.user_agent)):
            text = _text(ffi, pointer)
            if text:
                texts.append((name, text))
    else:  # SSH
        for name, chars in (("ssh_server", nd.protos.ssh.server_signature),
                            ("ssh_client", nd.protos.ssh.client_signature)):
            text = ffi.string(chars, 48).decode("utf-8", errors="replace")
            if text:
                texts.append((name, text))
    return tuple(texts)


_TEXT_PROTOCOLS = frozenset(("HTTP", "SSDP", "SSH"))


def read_ndpi_facts(ffi: Any, c: Any, protocol: int, application: str | None, risk_mask: int) -> NdpiFacts | None:
    """NdpiFacts of a flow structure (struct nf_flow) whose nDPI structure is still allocated, given the flow's IP
    protocol and nDPI's application name ("HTTP.Google": its master protocol first), keeping the risks of
    ``risk_mask``; None when there is nothing of note (see ACCEPTED_TCP). This runs for every flow and each field
    read through cffi costs a fraction of a microsecond: the common case reads three."""
    nd = c.ndpi_flow
    if not nd:
        return None
    risk = nd.risk & risk_mask
    handshake = 0
    if protocol == 6:
        flags = nd.l4.tcp
        handshake = flags.seen_syn | flags.seen_syn_ack << 1
    base = application.partition(".")[0] if application else ""
    texts = _texts(ffi, nd, base) if base in _TEXT_PROTOCOLS else ()
    if not risk and not texts and handshake == (3 if protocol == 6 else 0):
        return None
    info = tuple((i.id, _text(ffi, i.info)) for i in nd.risk_infos[0:min(nd.num_risk_infos, MAX_RISK_INFOS)]
                 if risk >> i.id & 1) if risk else ()
    return NdpiFacts(int(risk), info, texts, handshake)
