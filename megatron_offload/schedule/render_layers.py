"""Timelines of a layer-streaming simulation (issue 10): ASCII, and SVG/PNG through matplotlib.

Per rank three rows: compute entries (layer forwards light, layer backwards dark, coloured by
model chunk; the rest's entries and the epilogue grey), the D2H lane and the H2D lane (each
copy a hatched bar, coloured by chunk). Below, the memory curve of every rank in bytes: the
resident level (solid) and the level plus the running entry's transient (thin), with each
rank's peak marked. matplotlib is imported only when a picture is drawn.
"""
from __future__ import annotations

from collections.abc import Sequence

from .kinds import OpKind
from .layer_sim import LayerScheduleSimulation, LayerSimulation
from .render import save_with_memory_axis

_ASCII_HELP = ("a-z: layer forward of chunk 0, 1, ...; A-Z: layer backward; '-' the rest's "
               "forward/backward (and the epilogue); '.' idle; '>' D2H copy, '<' H2D copy")


def format_bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:g} B"


_DENSE = 3000
"""Entries per rank above which bars that abut are merged and copies drawn without hatching."""


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for begin, width in sorted(spans):
        if merged and begin <= merged[-1][0] + merged[-1][1] + 1e-12:
            merged[-1][1] = max(merged[-1][1], begin + width - merged[-1][0])
        else:
            merged.append([begin, width])
    return [(begin, width) for begin, width in merged]


def _ranks(sim) -> list[LayerSimulation]:
    return [sim] if isinstance(sim, LayerSimulation) else list(sim.ranks)


def _finish(ranks: Sequence[LayerSimulation]) -> float:
    return max((r.finish for r in ranks), default=0.0) or 1.0


def render_layers_ascii(sim: LayerSimulation | LayerScheduleSimulation, width: int = 100) -> str:
    """A text timeline ``width`` columns wide per rank: compute, D2H and H2D rows."""
    ranks = _ranks(sim)
    scale = _finish(ranks) / width
    lines = []
    for rank in ranks:
        rows = {name: ["."] * width for name in ("compute", "d2h", "h2d")}

        def paint(row, begin, end, mark, rows=rows):
            first = int(begin / scale + 0.5)
            last = max(first + 1, int(end / scale + 0.5))
            for column in range(first, min(last, width)):
                rows[row][column] = mark

        for op, begin, end in zip(rank.ops, rank.start, rank.end):
            if op.kind is OpKind.OFFLOAD:
                paint("d2h", begin, end, ">")
            elif op.kind is OpKind.RELOAD:
                paint("h2d", begin, end, "<")
            elif end > begin:
                if op.layer is None:
                    mark = "-"
                else:
                    mark = chr(
                        (ord("a") if op.kind is OpKind.FORWARD else ord("A")) + op.chunk % 26
                    )
                paint("compute", begin, end, mark)
        for _chunk, _mb, begin, end in rank.epilogues:
            if end > begin:
                paint("compute", begin, end, "-")
        lines.append(
            f"rank {rank.rank:<3}|{''.join(rows['compute'])}| peak {format_bytes(rank.peak_bytes)}")
        if rank.copies:
            lines.append(f"  d2h   |{''.join(rows['d2h'])}| {rank.copies} copies")
            lines.append(f"  h2d   |{''.join(rows['h2d'])}| stall {rank.stall:g}")
    lines.append(_ASCII_HELP)
    return "\n".join(lines)


def render_layer_figure(sim: LayerSimulation | LayerScheduleSimulation, path: str, *,
                        ranks: Sequence[int] | None = None, title: str | None = None) -> None:
    """Write the layer-level timeline and memory curves of ``sim`` (one rank or all; ``ranks``
    picks some) to ``path`` (.svg or .png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "drawing a timeline needs matplotlib: pip install 'megatron-offload[viz]'") from error

    shown = _ranks(sim)
    if ranks is not None:
        wanted = set(ranks)
        shown = [r for r in shown if r.rank in wanted]
        if not shown:
            raise ValueError(f"ranks {sorted(wanted)} are not in this simulation")
    finish = _finish(shown)
    palette = plt.get_cmap("tab10")
    rows = 3 * len(shown)
    figure, (timeline, memory) = plt.subplots(
        2, 1, figsize=(14, min(2.0 + 0.4 * rows + 2.4, 40)), sharex=True,
        gridspec_kw={"height_ratios": [max(rows * 0.4, 1.2), 2.4]},
    )
    ticks, labels = [], []
    chunks = set()
    for position, rank in enumerate(shown):
        base = 3 * position
        ticks += [base, base + 1, base + 2]
        labels += [f"rank {rank.rank}", "  D2H", "  H2D"]
        bars: dict = {}
        for op, begin, end in zip(rank.ops, rank.start, rank.end):
            chunks.add(op.chunk)
            if op.kind is OpKind.OFFLOAD:
                key = ("d2h", op.chunk)
            elif op.kind is OpKind.RELOAD:
                key = ("h2d", op.chunk)
            elif op.layer is None:
                key = ("rest", -1)
            else:
                key = ("F" if op.kind is OpKind.FORWARD else "B", op.chunk)
            if end > begin:
                bars.setdefault(key, []).append((begin, end - begin))
        for _chunk, _mb, begin, end in rank.epilogues:
            if end > begin:
                bars.setdefault(("rest", -1), []).append((begin, end - begin))
        dense = len(rank.ops) > _DENSE
        for (what, chunk), spans in bars.items():
            if dense:
                # thousands of entries: draw abutting bars of one kind as one (fast; same picture)
                spans = _merge(spans)
            if what == "rest":
                timeline.broken_barh(spans, (base - 0.4, 0.8), facecolors="0.6", edgecolor="white",
                                     linewidth=0.2)
                continue
            color = palette(chunk % 10)
            if what in ("F", "B"):
                timeline.broken_barh(spans, (base - 0.4, 0.8), facecolors=color,
                                     alpha=0.45 if what == "F" else 1.0,
                                     edgecolor="white", linewidth=0.2)
            else:
                y = base + (1 if what == "d2h" else 2)
                hatch = None if dense else "////" if what == "d2h" else "\\\\\\\\"
                timeline.broken_barh(spans, (y - 0.35, 0.7), facecolors=color, alpha=0.7,
                                     edgecolor=color, linewidth=0.3, hatch=hatch)
        if position:
            timeline.axhline(base - 0.5, color="grey", linewidth=0.4, alpha=0.5)
    timeline.set_yticks(ticks, labels, fontsize=8)
    timeline.set_ylim(3 * len(shown) - 0.5, -0.6)
    timeline.grid(axis="x", alpha=0.3)
    legend = []
    for chunk in sorted(chunks):
        legend.append(Patch(facecolor=palette(chunk % 10), alpha=0.45,
                            label=f"chunk {chunk} layer forward"))
        legend.append(Patch(facecolor=palette(chunk % 10), label=f"chunk {chunk} layer backward"))
    legend.append(Patch(facecolor="0.6", label="rest (embedding, loss, ...)"))
    legend.append(Patch(facecolor="grey", alpha=0.7, hatch="////", label="D2H copy"))
    legend.append(Patch(facecolor="grey", alpha=0.7, hatch="\\\\\\\\", label="H2D copy"))
    timeline.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                    frameon=False)
    copies = sum(r.copies for r in shown)
    stall = sum(r.stall for r in shown)
    summary = (f"layer granularity: finish {finish:g}, peak (max) "
               f"{format_bytes(max(r.peak_bytes for r in shown))}, {copies} D2H copies, stall "
               f"{stall:g}" + (", synchronous copies" if shown[0].link is None else ""))
    timeline.set_title(title or summary, fontsize=10, loc="left")

    top = max(max((c[2] for c in r.curve), default=0.0) for r in shown) or 1.0
    scale, unit = next(
        ((s, u) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= s),
        (1, "bytes"),
    )
    cmap = plt.get_cmap("viridis")
    for position, rank in enumerate(shown):
        color = cmap(position / max(len(shown) - 1, 1))
        times = [c[0] for c in rank.curve] + [finish]
        level = [c[1] / scale for c in rank.curve]
        live = [c[2] / scale for c in rank.curve]
        label = (
            f"rank {rank.rank} (peak {format_bytes(rank.peak_bytes)})"
            if len(shown) <= 8 or position in (0, len(shown) - 1)
            else None
        )
        memory.step(times, level + level[-1:], where="post", color=color, linewidth=1.3,
                    label=label)
        memory.step(times, live + live[-1:], where="post", color=color, linewidth=0.5, alpha=0.6)
        memory.axhline(rank.peak_bytes / scale, color=color, linewidth=0.6, linestyle="--",
                       alpha=0.7)
    save_with_memory_axis(figure, memory, f"activation {unit} (thin: with transients)", path)
