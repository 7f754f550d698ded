"""Timelines of a simulated schedule: ASCII for terminals, SVG/PNG through matplotlib.

One row per rank (plus its D2H and H2D lanes when the schedule offloads), coloured by model
chunk; forwards light, backwards dark; the memory curve of every rank below. matplotlib is
imported only when a picture is drawn (the package works without it).
"""
from __future__ import annotations

from .kinds import KIND_B, KIND_F, KIND_O, KIND_R
from .simulate import Simulation

_ASCII_HELP = ("a-z: forward of chunk 0, 1, ...; A-Z: backward; '.' idle; '>' offload (D2H), "
               "'<' reload (H2D)")


def _describe(sim: Simulation) -> str:
    s = sim.schedule
    group = "" if s.group_size is None else f" g={s.group_size}"
    return f"{s.kind} p={s.pp} v={s.vpp} m={s.microbatches}{group}"


def render_ascii(sim: Simulation, width: int = 100) -> str:
    """A text timeline ``width`` columns wide: each column shows what runs at its midpoint."""
    schedule = sim.schedule
    units = schedule.units_per_rank
    m = schedule.microbatches
    scale = sim.makespan / width if sim.makespan else 1.0
    offloads = bool(sim.offloaded_units)
    lines = [f"{_describe(sim)}: makespan {sim.makespan:g}, bubble {sim.bubble_ratio:.1%}, peak "
             f"units per rank {sim.peak_units}"]
    for rank in range(schedule.pp):
        rows = {kind: ["."] * width for kind in ("compute", "d2h", "h2d")}
        for code, begin, end in zip(schedule.program()[rank], sim.start[rank], sim.end[rank]):
            kind, unit = divmod(code, units)
            chunk = unit // m
            if kind == KIND_F:
                row, mark = "compute", chr(ord("a") + chunk % 26)
            elif kind == KIND_B:
                row, mark = "compute", chr(ord("A") + chunk % 26)
            else:
                row, mark = ("d2h", ">") if kind == KIND_O else ("h2d", "<")
            first = int(begin / scale + 0.5)
            last = max(first + 1, int(end / scale + 0.5))
            for column in range(first, min(last, width)):
                rows[row][column] = mark
        lines.append(f"rank {rank:<3}|{''.join(rows['compute'])}| peak {sim.peak_units[rank]}")
        if offloads:
            lines.append(f"  d2h   |{''.join(rows['d2h'])}|")
            lines.append(f"  h2d   |{''.join(rows['h2d'])}|")
    lines.append(_ASCII_HELP)
    return "\n".join(lines)


def render_figure(sim: Simulation, path: str, *, title: str | None = None) -> None:
    """Write the timeline and memory curves to ``path`` (.svg or .png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "drawing a timeline needs matplotlib: pip install 'megatron-offload[viz]'") from error

    schedule = sim.schedule
    pp, vpp, m = schedule.pp, schedule.vpp, schedule.microbatches
    units = schedule.units_per_rank
    offloads = bool(sim.offloaded_units)
    lanes_per_rank = 3 if offloads else 1
    palette = plt.get_cmap("tab10")
    rows = pp * lanes_per_rank
    height = min(2.0 + 0.45 * rows + 2.2, 40)
    figure, (timeline, memory) = plt.subplots(
        2, 1, figsize=(14, height), sharex=True,
        gridspec_kw={"height_ratios": [max(rows * 0.45, 1.5), 2.2]}
    )
    pixels_per_time = 14 * 72 / max(sim.makespan, 1e-9)  # rough, for deciding where labels fit
    labels = pixels_per_time * min(
        min(sim.costs.forward(c) for c in range(vpp)),
        min(sim.costs.backward(c) for c in range(vpp))
    ) > 9 and pp * units <= 4000
    ticks, tick_labels = [], []
    for rank in range(pp):
        base = rank * lanes_per_rank
        ticks.append(base)
        tick_labels.append(f"rank {rank}")
        if offloads:
            ticks += [base + 0.75, base + 1.25]
            tick_labels += ["  D2H", "  H2D"]
        bars: dict = {}
        for code, begin, end in zip(schedule.program()[rank], sim.start[rank], sim.end[rank]):
            kind, unit = divmod(code, units)
            chunk, mb = divmod(unit, m)
            if kind in (KIND_F, KIND_B):
                y, h = base - 0.4, 0.8
            else:
                y, h = (base + 0.55, 0.4) if kind == KIND_O else (base + 1.05, 0.4)
            bars.setdefault((kind, chunk, y, h), []).append((begin, end - begin))
            if labels and kind in (KIND_F, KIND_B):
                timeline.text(begin + (end - begin) / 2, base, str(mb), ha="center", va="center",
                              fontsize=6, color="black" if kind == KIND_F else "white")
        for (kind, chunk, y, h), spans in bars.items():
            color = palette(chunk % 10)
            alpha = {KIND_F: 0.45, KIND_B: 1.0, KIND_O: 0.7, KIND_R: 0.7}[kind]
            hatch = {KIND_O: "////", KIND_R: "\\\\\\\\"}.get(kind)
            timeline.broken_barh(spans, (y, h), facecolors=color, alpha=alpha,
                                 edgecolor="white" if kind < KIND_O else color,
                                 linewidth=0.3, hatch=hatch)
    timeline.set_yticks(ticks, tick_labels, fontsize=8)
    last = (pp - 1) * lanes_per_rank
    timeline.set_ylim(last + (1.6 if offloads else 0.6), -0.6)
    for rank in range(1, pp):  # a faint line between ranks
        timeline.axhline(rank * lanes_per_rank - (0.5 if not offloads else 0.9), color="grey",
                         linewidth=0.4, alpha=0.5)
    timeline.grid(axis="x", alpha=0.3)
    legend = []
    for chunk in range(vpp):
        legend.append(Patch(facecolor=palette(chunk % 10), alpha=0.45,
                            label=f"chunk {chunk} forward"))
        legend.append(Patch(facecolor=palette(chunk % 10), label=f"chunk {chunk} backward"))
    if offloads:
        legend.append(Patch(facecolor="grey", alpha=0.7, hatch="////", label="offload (D2H)"))
        legend.append(Patch(facecolor="grey", alpha=0.7, hatch="\\\\\\\\", label="reload (H2D)"))
    timeline.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                    frameon=False)
    summary = (
        f"makespan {sim.makespan:g}, bubble {sim.bubble_ratio:.1%}, peak units (rank 0 / max) "
        f"{sim.peak_units[0]} / {max(sim.peak_units)}"
    )
    if offloads:
        summary += (f", offloaded {sim.offloaded_fraction:.0%} (k={sim.costs.offload_ratio:g}), "
                    f"slowdown {sim.slowdown:.1%}")
    timeline.set_title(title or f"{_describe(sim)}: {summary}", fontsize=10, loc="left")

    cmap = plt.get_cmap("viridis")
    for rank in range(pp):
        curve = sim.memory_curve(rank)
        times = [t for t, _ in curve] + [sim.makespan]
        levels = [level for _, level in curve] + [curve[-1][1]]
        memory.step(times, levels, where="post", color=cmap(rank / max(pp - 1, 1)), linewidth=1.4,
                    label=(f"rank {rank} (peak {sim.peak_units[rank]})"
                           if pp <= 8 or rank in (0, pp - 1) else None))
    save_with_memory_axis(figure, memory, "resident units", path)


def save_with_memory_axis(figure, memory, ylabel: str, path: str) -> None:
    """Finish a timeline's memory panel (labels, grid, legend outside) and save the figure."""
    import matplotlib.pyplot as plt

    memory.set_ylabel(ylabel)
    memory.set_xlabel("time")
    memory.set_ylim(bottom=0)
    memory.grid(alpha=0.3)
    memory.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
