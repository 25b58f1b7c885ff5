"""`iotscan inspect`: one flow of a capture, down to its packets, dissected by tshark through pyshark.

selection.py finds the flow, tshark.py runs tshark, fields.py reads each protocol's fields, records.py
builds the packet records, table.py shows them on a terminal. This package may import ``iotscan.capture``,
``iotscan.output``, ``iotscan.stage`` and ``iotscan.errors``.

Two passes over the capture, each at the speed of its tool, then a small one:

1. NFStream (iotscan.capture.source.FlowSource + iotscan.output.records.flow_record) finds the flow. ``flow_id`` is
   deterministic (capture name, flow key, first packet), so re-metering the capture with the
   same timeouts as ``analyze`` gives the same ids; the pass stops as soon as the flow is found,
   and meters only the packets of the 5-tuple when one is given (a BPF filter).
2. tshark reads the capture with a display filter made of the flow's 5-tuple, VLAN and time
   window and prints the frame number of each match (select_frames); it is stopped as soon as it
   has read past the flow's end (see flows_filter) or ``--limit`` is reached.
3. editcap cuts those frames out into a temporary file and tshark dissects only them into PDML
   (dissect_frames), so only the flow's packets get full protocol trees and reach Python, where
   pyshark turns each into a Packet and this module into a flat ``packet`` record. (tshark
   writing PDML straight from the capture would build the full tree of every packet it reads:
   twice the cost of step 2.)

tshark is run here, not through ``pyshark.FileCapture``: FileCapture kills tshark at end of
output before reading its exit status (a damaged capture could look complete), raises again from
``close()`` and ``__del__``, looks for tshark in a ``config.ini`` of the current directory, and
relies on asyncio child watchers (removed in Python 3.14). The command line of step 3 is the one
pyshark builds (``tshark -l -n -T pdml -r FILE``) and each packet goes through pyshark's own
PDML parser, so the Packet/XmlLayer objects are pyshark's.

pyshark and tshark are needed by this command only: pyshark is imported lazily, and a missing
tshark is reported as a capture-tooling error (exit code 3) with the command that installs it.
"""

from __future__ import annotations

from iotscan.inspect.records import inspect_capture, packet_record, read_flow_packets
from iotscan.inspect.selection import (
    FiveTuple,
    FlowSelector,
    InspectCommandStage,
    find_flows,
    flow_filter,
    flows_filter,
    inspect_command,
    parse_five_tuple,
    record_five_tuple,
)
from iotscan.inspect.table import PacketTableSink, hexdump
from iotscan.inspect.tshark import INSTALL_HINT, Tools, find_tshark

__all__ = [
    "INSTALL_HINT", "FiveTuple", "FlowSelector", "InspectCommandStage", "PacketTableSink", "Tools", "find_flows",
    "find_tshark", "flow_filter", "flows_filter", "hexdump", "inspect_capture", "inspect_command", "packet_record",
    "parse_five_tuple", "read_flow_packets", "record_five_tuple",
]
