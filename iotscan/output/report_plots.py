"""The report's figures, drawn with matplotlib as inline SVG: no JavaScript, nothing fetched, text kept as text.

matplotlib is an optional dependency (the ``report`` extra) and is imported only in here, when a report is
drawn: the other commands do not load it. Every figure is made from the builder's bounded summaries.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from iotscan.errors import IotscanError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from iotscan.output.report import SourceTrack

INSTALL_HINT = ("the HTML report draws its figures with matplotlib, which is not installed: pip install matplotlib "
                "(or install iotscan with its report extra: pip install 'iotscan[report]')")

# One colour per series, the same in every figure and in the page's tables
COLOURS = {"benign": "#9aa5b1", "unscored": "#c8ced4", "other verdicts": "#6b7785", "ddos": "#c0392b",
           "dos": "#e67e22", "scan": "#8e44ad", "bruteforce": "#d4ac0d", "c2": "#1f6fb2", "exploit": "#16a085",
           "spoofing": "#d35490", "unknown": "#5d4037", "other": "#34495e"}
_SPARE = ("#7f8c3a", "#2c7873", "#a0522d", "#4b6584", "#b33771", "#596275")
ATTACK_RED, LINK_BLUE = "#c0392b", "#5b7db1"


def require() -> None:
    """Fail before any work when matplotlib is missing: one line, exit 2."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise IotscanError(INSTALL_HINT) from None


def colour(series: str) -> str:
    return COLOURS.get(series) or _SPARE[sum(map(ord, series)) % len(_SPARE)]


def plain(text: str) -> str:
    """Text as matplotlib must draw it verbatim: a '$' would start mathtext."""
    return text.replace("$", r"\$")


@contextmanager
def _figure(name: str, width: float, height: float, layout: str | None = "constrained") -> Iterator[Figure]:
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no backend, no global figure registry

    # text stays text (small, selectable, in the page's font); ids are salted by figure so that the figures of
    # one page never share one, and the same data draws the same SVG
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"iotscan-{name}", "font.size": 9,
                                "font.family": "sans-serif", "axes.spines.top": False,
                                "axes.spines.right": False, "axes.titlesize": 9, "axes.titleweight": "bold",
                                "axes.titlelocation": "left", "legend.frameon": False}):
        yield Figure(figsize=(width, height), layout=layout)


def svg(fig: Figure) -> str:
    """The figure as an <svg> element to inline in HTML (no XML prolog, no doctype, sized by CSS)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 role="img"', text, count=1)


def _date(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).replace(tzinfo=None)


def timeline(tracks: Sequence[tuple[str, SourceTrack]], order: Sequence[str]) -> str:
    """Flows per time bin of each source, stacked by series (benign below, attack families above), with the
    alerts and floods marked; one panel per source, each on its own time axis."""
    import matplotlib.dates as mdates
    from matplotlib.ticker import MaxNLocator

    with _figure("timeline", 10, 0.6 + 1.7 * len(tracks)) as fig:
        axes = fig.subplots(len(tracks), 1, squeeze=False)[:, 0]
        drawn: dict[str, Any] = {}
        for ax, (source, track) in zip(axes, tracks, strict=True):
            bins, width = track.bins, track.bins.width_ms
            edges = [mdates.date2num(_date(i * width)) for i in range(bins.lo, bins.hi + 2)]
            base = [0] * (bins.hi - bins.lo + 1)
            present = {name for counts in bins.bins.values() for name in counts}
            for name in [s for s in order if s in present]:
                values = [bins.bins.get(i, {}).get(name, 0) for i in range(bins.lo, bins.hi + 1)]
                top = [b + v for b, v in zip(base, values, strict=True)]
                drawn[name] = ax.stairs(top, edges, baseline=base, fill=True, color=colour(name), linewidth=0)
                base = top
            for at, kind in track.marks:
                drawn[kind] = ax.plot([mdates.date2num(_date(at))], [max(base or [1]) * 1.04], "v",
                                      color=ATTACK_RED if kind == "alert" else "#6c3483", markersize=6)[0]
            ax.set_title(plain(f"{source}: {track.flows:,} flows, bins of {_duration(width)}"), fontsize=8.5)
            ax.set_ylabel("flows")
            ax.set_ylim(0, max(base or [1]) * 1.12 + 0.5)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            locator = mdates.AutoDateLocator(minticks=3, maxticks=9)  # every span from 1 ms to years
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, show_offset=True))
            ax.set_xlim(edges[0], edges[-1])  # a mark out of the flows' span is not drawn
        fig.legend(list(drawn.values()), list(drawn), loc="outside lower center", ncols=min(len(drawn), 8))
        return svg(fig)


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:g} {unit}"
    return f"{ms} ms"


def scores(histograms: dict[str, list[int]], threshold: float | None) -> str:
    """How the classifier's scores are spread, per verdict (log scale: a flood's flows dwarf the rest)."""
    with _figure("scores", 10, 2.6) as fig:
        ax = fig.subplots()
        n = len(next(iter(histograms.values())))
        lefts = [i / n for i in range(n)]
        base = [0] * n
        for name in ("benign", "other verdicts", "attack"):
            counts = histograms.get(name)
            if counts:
                ax.bar(lefts, counts, width=1 / n, bottom=base, align="edge", label=name,
                       color=ATTACK_RED if name == "attack" else colour(name), edgecolor="white", linewidth=0.5)
                base = [b + c for b, c in zip(base, counts, strict=True)]
        if threshold is not None:
            ax.axvline(threshold, color="#222", linestyle="--", linewidth=1)
            ax.annotate(f"threshold {threshold:g}", (threshold, 1), xycoords=("data", "axes fraction"),
                        xytext=(-4, -2), textcoords="offset points", ha="right", va="top", fontsize=8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel("score (probability of attack)")
        ax.set_ylabel("flows")
        fig.legend(loc="outside lower center", ncols=3)
        return svg(fig)


def talk(pairs: Sequence[tuple[str, str, int, int]], labels: dict[str, str]) -> str:
    """Local hosts (left) and their peers (right), a line per pair as thick as its bytes (log), red when the pair
    carried attack flows. ``pairs``: (local, peer, bytes, attack flows), heaviest first."""
    left = _ordered((p[0], p[2]) for p in pairs)
    right = _ordered((p[1], p[2]) for p in pairs)
    rows = max(len(left), len(right), 2)
    heaviest = max(p[2] for p in pairs) or 1
    with _figure("talk", 10, 0.6 + 0.24 * rows, layout=None) as fig:
        ax = fig.add_axes((0.36, 0.02, 0.28, 0.96))
        ax.set_axis_off()

        def y(index: int, count: int) -> float:
            return 1 - (index + 0.5) / count if count else 0.5

        ly = {n: y(i, len(left)) for i, n in enumerate(left)}
        ry = {n: y(i, len(right)) for i, n in enumerate(right)}
        for local, peer, size, attacks in reversed(pairs):  # the heaviest drawn last, on top
            weight = math.log1p(size) / math.log1p(heaviest)
            ax.plot([0, 1], [ly[local], ry[peer]], color=ATTACK_RED if attacks else LINK_BLUE,
                    linewidth=0.6 + 3.4 * weight, alpha=0.45 + 0.4 * weight, solid_capstyle="round")
        for names, ys, x, ha in ((left, ly, -0.02, "right"), (right, ry, 1.02, "left")):
            ax.plot([x + (0.02 if ha == "right" else -0.02)] * len(names), [ys[n] for n in names], "o",
                    color="#34495e", markersize=3.5, clip_on=False)
            for n in names:
                ax.text(x, ys[n], plain(labels.get(n, n)), ha=ha, va="center", fontsize=8, clip_on=False)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        return svg(fig)


def _ordered(weights: Iterator[tuple[str, int]]) -> list[str]:
    totals: dict[str, int] = {}
    for name, size in weights:
        totals[name] = totals.get(name, 0) + size
    return sorted(totals, key=lambda n: -totals[n])


def per_class(classes: dict[str, dict[str, float]]) -> str:
    """The flow model's recall and precision per class, from its card (leave one source out)."""
    names = list(classes)
    with _figure("model", 10, 0.8 + 0.22 * len(names)) as fig:
        ax = fig.subplots()
        ys = range(len(names))
        for offset, metric, shade in ((-0.2, "recall", "#1f6fb2"), (0.2, "precision", "#9ab8d8")):
            values = [classes[n].get(metric) or 0.0 for n in names]
            ax.barh([y + offset for y in ys], values, height=0.38, color=shade, label=metric)
        ax.set_yticks(list(ys), [plain(n) for n in names])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("on captures of sources the model never saw")
        fig.legend(loc="outside lower center", ncols=2)
        return svg(fig)
