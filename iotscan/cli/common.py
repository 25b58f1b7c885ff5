"""Options and output plumbing shared by the commands."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING

import typer

from iotscan.capture.source import DEFAULT_MAX_FLOWS, MeterConfig
from iotscan.detect.modelstore import ModelContent
from iotscan.errors import InputError, OutputError
from iotscan.output.records import (
    BASELINE_FIELDS,
    DEVICE_LINK_FIELDS,
    FLOW_FIELD_NAMES,
    RISK_FIELD_NAMES,
    RISK_SEVERITIES,
    VERDICT_FIELDS,
    HeldFlows,
    MeteredFlow,
    metered_flow,
)
from iotscan.stage import Stage

if TYPE_CHECKING:
    from iotscan.devices.signatures import Signatures


class Format(str, Enum):
    table = "table"
    ndjson = "ndjson"
    json = "json"
    csv = "csv"


_SUFFIX_FORMATS = {".csv": Format.csv, ".json": Format.json, ".ndjson": Format.ndjson, ".jsonl": Format.ndjson}

FORMAT_OPTION = typer.Option(None, "--format", "-f", case_sensitive=False,
                             help="Output format. Default: table on a terminal, else ndjson "
                                  "(with -o, from the file's suffix).")
def stdout_dash(output: Path | None) -> Path | None:
    """`-o -` is stdout, as for other Unix tools (not a file named "-")."""
    return None if output is not None and str(output) == "-" else output


OUTPUT_OPTION = typer.Option(None, "--output", "-o", dir_okay=False, callback=stdout_dash,
                             help="Write records to FILE instead of stdout ('-': stdout).")
BPF_OPTION = typer.Option(None, "--bpf", help="BPF filter applied before metering, e.g. 'not port 53'.")
IDLE_OPTION = typer.Option(120, "--idle-timeout", min=1, help="Seconds without packets after which a flow ends.")
ACTIVE_OPTION = typer.Option(1800, "--active-timeout", min=1, help="Seconds after which a long flow is cut.")
MAX_FLOWS_OPTION = typer.Option(
    DEFAULT_MAX_FLOWS, "--max-flows", min=0,
    help="Most flows tracked at once (each costs about 5 KB: the default bounds the flow table near 500 MB on "
         "a flood of spoofed sources); when full, the least recently active flow is expired early and a warning "
         "says so. 0: no cap.")
CAPTURE_BUFFER_MIB = 64
CAPTURE_BUFFER_OPTION = typer.Option(
    CAPTURE_BUFFER_MIB, "--capture-buffer", metavar="MIB", min=2, max=2047,
    help="The kernel's buffer for the capture, in MiB: packets wait there while iotscan is busy, so a burst "
         "(a flood's start) is not dropped; beyond it the kernel drops and the summary says how many. Each side "
         "capture gets a quarter.")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bars or warnings on stderr.")
NO_DEVICES_OPTION = typer.Option(False, "--no-devices", help="Skip device fingerprinting (no device records, "
                                 "no src_device/dst_device fields).")
FAIL_ON_OPTION = typer.Option(
    None, "--fail-on",
    help="Exit 1 when a flow is an attack ('attack') or of one family (ddos, dos, scan, bruteforce, c2, exploit, "
         "spoofing), or on an alert of one kind (scan, compromised; with --baseline: anomaly, new_device); or shows "
         "a risk: 'risk:high' (high or critical; also risk:low, risk:medium, risk:critical), 'risk:ID' (one risk of "
         "docs/risks.md, e.g. risk:cleartext_credentials), 'risk' (any).")
NO_RISKS_OPTION = typer.Option(False, "--no-risks", help="Skip the risk stage (no risks on flows, no risk posture "
                               "on devices).")
BASELINE_OPTION = typer.Option(
    None, "--baseline", dir_okay=False,
    help="Score every flow of the devices of this baseline (made by `iotscan baseline learn`) against what they "
         "normally do: anomaly fields, and alerts for anomalies and for devices it does not know. Also a MUD file "
         "(RFC 8520) as MAC=FILE, or a file `iotscan baseline export-mud` named by MAC. Repeat for several MUD "
         "files.")
BASELINE_THRESHOLD_OPTION = typer.Option(None, "--baseline-threshold", min=0.0, max=1.0,
                                         help="Anomaly at or above which a flow is an alert (default 0.75).")
THRESHOLD_OPTION = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                help="Score at or above which a flow is an attack (default: the model card's).")
MODEL_OPTION = typer.Option(None, "--model", dir_okay=False,
                            help="Score with this model file instead of the bundled one (needs --trust-model).")
TRUST_MODEL_OPTION = typer.Option(False, "--trust-model",
                                  help="Load --model without verification: a model file is a pickle and runs code.")
NO_SCORE_OPTION = typer.Option(False, "--no-score", help="Skip scoring (no verdict, score, family, reasons).")
NO_HOSTS_OPTION = typer.Option(False, "--no-hosts", help="Skip the host-behaviour stage (scans by outcome, "
                               "compromised devices, DNS tunnels: alert records).")


class FloodRecords(str, Enum):
    summary = "summary"
    all = "all"


FLOOD_RECORDS_OPTION = typer.Option(
    FloodRecords.summary, "--flood-records", case_sensitive=False,
    help="summary: a flood's one- and two-packet flows are folded into one 'flood' record per target service and "
         "minute (counted in the summary's flows and attacks); all: a flow record for every flow, as without "
         "floods.")
SIGNATURES_OPTION = typer.Option(
    None, "--signatures", dir_okay=False,
    help="Your own device signatures (a JSON file in the format of iotscan/data/device_types.json, see "
         "docs/device-types.md), added to the bundled ones; repeat for several files.")
ATTACKS_ONLY_OPTION = typer.Option(
    False, "--attacks-only",
    help="Write only the flow records judged attacks (device records and the summary still follow): an alert "
         "stream for a SIEM. summary.flows still counts every flow.")


def check_fail_on(fail_on: str | None, risks: bool) -> None:
    """A --fail-on risk form names a severity or a risk of the catalogue, and needs the risk stage."""
    if fail_on is None or not (fail_on == "risk" or fail_on.startswith("risk:")):
        return
    if not risks:
        raise InputError(f"--fail-on {fail_on} needs the risks that --no-risks skips: give one or the other")
    target = fail_on.partition(":")[2]
    if target and target not in RISK_SEVERITIES:
        from iotscan.detect.risk_catalogue import load_catalogue

        known = load_catalogue().risks
        if target not in known:
            raise InputError(f"--fail-on {fail_on}: no such risk level or risk; levels: {', '.join(RISK_SEVERITIES)}; "
                             f"risks: {', '.join(known)}")


def check_attacks_only(attacks_only: bool, no_score: bool) -> None:
    if attacks_only and no_score:
        raise InputError("--attacks-only needs the verdicts that --no-score skips: give one or the other")


def resolve_format(fmt: Format | None, output: Path | None) -> Format:
    if fmt is not None:
        return fmt
    if output is not None:
        return _SUFFIX_FORMATS.get(output.suffix.lower(), Format.ndjson)
    return Format.table if sys.stdout.isatty() else Format.ndjson


class OutputStream(io.BufferedIOBase):
    """Where the records go (stdout or a file): a write that fails, at open or later (a full disk, a lost
    mount), ends the run with a one-line error and exit code 2 rather than a bug report."""

    def __init__(self, raw: IO[bytes], name: str, owned: bool) -> None:
        super().__init__()
        self.raw, self.name, self.owned = raw, name, owned

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def tell(self) -> int:
        return self.raw.tell()

    def isatty(self) -> bool:
        return self.raw.isatty()

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        try:  # written out: once per record
            written = self.raw.write(data)
            if written is not None and written < len(data):
                # a signal (Ctrl-C) during a large write to a full pipe: BufferedWriter returns what it wrote, and
                # the rest is ours to write (a record cut there was glued to the next one)
                view = memoryview(data)[written:]
                while view:
                    view = view[self.raw.write(view) or 0:]
            return len(data)
        except OSError as exc:
            raise self._failed(exc) from exc

    def flush(self) -> None:
        if not self.raw.closed:
            try:
                self.raw.flush()
            except OSError as exc:
                raise self._failed(exc) from exc

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # flushes
        finally:
            if self.owned:
                try:
                    self.raw.close()
                except OSError as exc:
                    raise self._failed(exc) from exc

    def _failed(self, exc: OSError) -> OutputError:
        if self.raw is sys.stdout.buffer:
            # the interpreter flushes stdout again on its way out: let that go nowhere, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.raw.fileno())
            os.close(devnull)
        return OutputError(f"{self.name}: cannot write output: {exc.strerror or exc}")


def open_output(output: Path | None, inputs: Sequence[str | os.PathLike[str]] = (),
                append: bool = False) -> OutputStream:
    """stdout, or FILE; refuses to write over any input the user gave."""
    if output is None:
        return OutputStream(sys.stdout.buffer, "stdout", owned=False)
    for given in inputs:
        try:
            if Path(given).is_file() and output.exists() and os.path.samefile(given, output):
                raise InputError(f"{output}: refusing to overwrite an input capture with output")
        except OSError:
            continue
    try:
        return OutputStream(output.open("ab" if append else "wb"), str(output), owned=True)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write output: {exc.strerror or exc}") from exc


def main_pass_config(source: str, *, score: bool, risks: bool = False, live: bool = False, bpf: str | None = None,
                     idle_timeout: int = 120, active_timeout: int = 1800, max_flows: int = DEFAULT_MAX_FLOWS,
                     snaplen: int = 1536, buffer_mib: int = 0) -> MeterConfig:
    """The meter settings of the main pass, the same for `analyze`, `live` and `devices` (flow ids, and the
    features the model was trained on, depend on them); with ``risks``, the meter reads nDPI's risks of each
    flow (MeterConfig.ndpi_facts)."""
    # what the classifier's features read: early packets, and each flow's block of statistics from the meter
    from iotscan.detect.features import METER_SETTINGS, metered_flow_with_statistics

    # the nDPI risks the risk catalogue reads: the meter sends nothing of a flow with others only
    mask = 0
    if risks:
        from iotscan.detect.risk_catalogue import load_catalogue

        mask = sum(1 << bit for bit in load_catalogue().ndpi_bits)
    # unscored, the meter computes no statistics: nothing else reads them
    return MeterConfig(source=source, live=live, bpf=bpf, idle_timeout=idle_timeout, active_timeout=active_timeout,
                       max_flows=max_flows, snaplen=snaplen, buffer_mib=buffer_mib, statistics=score,
                       ndpi_facts=risks, ndpi_risk_mask=mask,
                       splt=METER_SETTINGS["splt"] if score else 0,
                       reduce=metered_flow_with_statistics if score else metered_flow, item_type=MeteredFlow,
                       held_reduce=metered_flow if score else None, held_type=HeldFlows)


def flow_columns(devices: bool, score: bool, risks: bool = False, baseline: bool = False) -> tuple[str, ...]:
    """CSV columns of flow records: the contract, then what the enabled stages add."""
    return FLOW_FIELD_NAMES + (DEVICE_LINK_FIELDS if devices else ()) + (VERDICT_FIELDS if score else ()) + \
        (RISK_FIELD_NAMES if risks else ()) + (BASELINE_FIELDS if baseline else ())


def device_signatures(paths: Sequence[Path] | None) -> Signatures:
    """The bundled device signatures extended by the user's files (a bad file: one line, exit 2)."""
    from iotscan.devices.signatures import load_signatures

    return load_signatures(tuple(str(p) for p in paths or ()))


@dataclass(frozen=True)
class StageOptions:
    """The stages `analyze` runs, as options: what a worker of iotscan.cluster builds them from (the same as here;
    a --model of the user's travels as its content)."""

    devices: bool = True
    score: bool = True
    model: Path | ModelContent | None = None
    trust_model: bool = False
    threshold: float | None = None
    hosts: bool = True
    flood_records: FloodRecords = FloodRecords.summary
    signatures: tuple[Path, ...] = ()  # the user's device signature files
    risks: bool = True
    baseline: tuple[str, ...] = ()  # --baseline FILE (or MAC=MUD-FILE) specs
    baseline_threshold: float | None = None
    explain: bool = False
    idle_timeout: int = 120
    active_timeout: int = 1800
    device_model: bool = True  # the workers count devices, the client fingerprints them: only it needs the model

    def build(self) -> list[Stage]:
        """The stages, models verified (a bundled one by its SHA-256, a shipped one against the client's)."""
        model = self.model.materialize() if isinstance(self.model, ModelContent) else self.model
        stages = build_stages(devices=self.devices, score=self.score, model_path=model, trust_model=self.trust_model,
                              threshold=self.threshold, hosts=self.hosts, flood_records=self.flood_records,
                              signatures=self.signatures, risks=self.risks, device_model=self.device_model,
                              baseline=self.baseline, baseline_threshold=self.baseline_threshold)
        if self.explain:
            from iotscan.inspect import InspectCommandStage

            stages.append(InspectCommandStage(idle_timeout=self.idle_timeout, active_timeout=self.active_timeout))
        return stages

    def shipped(self) -> StageOptions:
        """These options for the workers of iotscan.cluster: the model file read (sent by content), no device model
        (nor the user's device signatures: the client fingerprints)."""
        model = ModelContent.read(self.model) if isinstance(self.model, Path) and self.score else self.model
        return replace(self, model=model, device_model=False, signatures=())


def mac_vendor(mac: str) -> str | None:
    """A MAC's vendor, for the live view and new-device alerts (the device stage's registry and signature names)."""
    from iotscan.devices.signatures import load_signatures

    if mac == "00:00:00:00:00:00":  # loopback's (the registry names Xerox)
        return None
    found = load_signatures().mac_vendor(mac)
    return found.vendor or found.org


def build_stages(devices: bool = True, score: bool = True, model_path: Path | None = None,
                 trust_model: bool = False, threshold: float | None = None, hosts: bool = True,
                 flood_records: FloodRecords = FloodRecords.summary,
                 signatures: Sequence[Path] | None = None, risks: bool = False,
                 device_stage: Stage | None = None, device_model: bool = True,
                 baseline: Sequence[str] | None = None, baseline_threshold: float | None = None,
                 learn_s: float | None = None, live: bool = False) -> list[Stage]:
    """The enrichment, scoring and risk stages shared by `analyze`, `live` and `devices`, in pipeline order:
    devices first (the others read the device links), then the request pass that scoring and risks share; the
    host-behaviour stage judges hosts over the flows the scoring stage judged, so it runs with scoring only. Without
    ``device_model`` the device stage counts devices but cannot fingerprint them (finish(): a client does); the
    baseline stage reads the device stage's links and borrows the host stage's DNS answers."""
    stages: list[Stage] = []
    if devices:
        from iotscan.devices.stage import DeviceStage  # deferred: loads the device model

        stages.append(device_stage or DeviceStage(use_model=device_model, signatures=device_signatures(signatures)))
    requests = None
    if score or risks:
        from iotscan.detect.request_stage import RequestPassStage

        requests = RequestPassStage()
        stages.append(requests)
    if score:
        from iotscan.detect.scoring import ScoringStage  # deferred: loads (and verifies) the flow model

        stages.append(ScoringStage(model_path, trusted=trust_model, threshold=threshold,
                                   fold_floods=flood_records == FloodRecords.summary, requests=requests))
        if hosts:
            from iotscan.detect.hosts import HostStage

            stages.append(HostStage())
    if risks:
        from iotscan.detect.risk_stage import RiskStage

        stages.append(RiskStage(requests=requests))
    if baseline or learn_s:
        stages.append(baseline_stage(baseline or (), stages, devices, baseline_threshold, learn_s, live))
    return stages


def baseline_stage(specs: Sequence[str], stages: Sequence[Stage], devices: bool, threshold: float | None,
                   learn_s: float | None = None, live: bool = False) -> Stage:
    """The baseline stage of --baseline FILE... (a bad file fails here, before any output is written); on an
    interface it learns first for ``learn_s`` seconds (live --learn), and keeps the profiles current."""
    from iotscan.detect.baseline import THRESHOLD, BaselineStage
    from iotscan.detect.hosts import HostStage
    from iotscan.detect.mud import load_baselines

    if not devices:
        raise InputError("--baseline compares devices with their profiles: it needs the device stage "
                         "(drop --no-devices)")
    doc, policies = load_baselines(specs)
    host = next((s for s in stages if isinstance(s, HostStage)), None)
    return BaselineStage(doc, threshold=THRESHOLD if threshold is None else threshold,
                         borrow=(lambda: host.replies) if host is not None else None, mud=policies, vendor=mac_vendor,
                         learn_s=learn_s, drift=live)
