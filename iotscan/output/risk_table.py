"""The terminal's view of device risk: devices ranked by risk_score, and per device its risks with what to do.

Kept apart from the terminal table's other parts (table.py calls it): it reads only the device records' risk
fields (records.DEVICE_RISK_FIELDS), present when the risk stage ran.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

MAX_DEVICES_SHOWN = 20
_GRADE_STYLE = {"A": "green", "B": "green", "C": "yellow", "D": "red", "F": "bold red"}
_SEVERITY_STYLE = {"low": "", "medium": "yellow", "high": "red", "critical": "bold red"}


def by_risk(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Devices with the highest risk_score first (then the busiest); by bytes when no risk stage ran."""
    return sorted(devices, key=lambda d: (-(d.get("risk_score") or 0), -(d.get("bytes") or 0)))


def risk_cell(device: dict[str, Any]) -> str:
    """"62 D" for the device table's risk column ("" without the risk stage)."""
    if device.get("risk_score") is None:
        return ""
    grade = device.get("risk_grade") or ""
    style = _GRADE_STYLE.get(grade)
    return f"{device['risk_score']} [{style}]{escape(grade)}[/]" if style else f"{device['risk_score']} {escape(grade)}"


def risk_table(devices: list[dict[str, Any]]) -> Table | None:
    """Per device with risks, worst first: each risk, its severity, how often, and the one thing to do."""
    risky = [d for d in by_risk(devices) if d.get("risks")]
    if not risky:
        return None
    shown = risky[:MAX_DEVICES_SHOWN]
    more = f" (the {len(shown)} worst of {len(risky)})" if len(risky) > len(shown) else ""
    table = Table(title=f"Device risks, worst first{more}", box=box.SIMPLE_HEAD, title_style="bold")
    table.add_column("device", no_wrap=True)
    table.add_column("score", no_wrap=True, justify="right")
    table.add_column("risk", overflow="fold")
    table.add_column("flows", justify="right", no_wrap=True)
    table.add_column("what to do", overflow="fold")
    for d in shown:
        name = " ".join(v for v in (d.get("vendor"), d.get("device_type")) if v and v != "unknown")
        label = f"{d.get('mac') or ''}\n{name}" if name else d.get("mac") or ""
        for i, risk in enumerate(d["risks"]):
            style = _SEVERITY_STYLE.get(risk.get("severity"), "")
            title = f"{escape(risk.get('title') or risk['risk'])} ({escape(risk.get('severity') or '')})"
            where = " [dim]Internet[/]" if risk.get("internet") else ""
            table.add_row(escape(label) if i == 0 else "", risk_cell(d) if i == 0 else "",
                          f"[{style}]{title}[/]{where}" if style else f"{title}{where}",
                          f"{risk.get('flows') or 0:,}", escape(risk.get("fix") or ""),
                          end_section=i == len(d["risks"]) - 1)
    return table
