"""Pictures of a bit allocation: the Figure-3-style chart (bits per layer over the importance) and the
sensitivity picture that shows why each layer got its width (bits, the cost weight, the measured error)."""

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mqsam2.allocation import Allocation, module_family
from mqsam2.files import atomic_output
from mqsam2.importance import LayerImportance


def plot_allocation(
    names: Sequence[str],
    bits: Sequence[int],
    scores: Sequence[float],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Figure-3-style chart: bit-width per layer in the given (network) order, coloured by module family,
    with the importance scores on a log axis on top; written as a PNG without pyplot's global state."""
    families = [module_family(name) for name in names]
    colours = {family: f"C{i}" for i, family in enumerate(dict.fromkeys(families))}
    positions = range(len(names))
    figure = Figure(figsize=(max(8.0, 0.05 * len(names)), 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.bar(
        positions, bits, width=1.0, color=[colours[family] for family in families], edgecolor="white", lw=0.2
    )
    _family_bounds(axes, families)
    axes.set(
        xlim=(-0.5, len(names) - 0.5), ylim=(max(min(bits) - 1, 0), max(bits) + 0.5), yticks=sorted(set(bits))
    )
    axes.set(xlabel="layer (network order)", ylabel="bit-width", title=title)
    importance_axes = axes.twinx()
    (marks,) = importance_axes.plot(positions, scores, "k.", ms=3, label="importance $S_l$")
    if min(scores) > 0:
        importance_axes.set_yscale("log")
    importance_axes.set_ylabel("importance $S_l$")
    handles = [Patch(color=colour, label=family) for family, colour in colours.items()] + [marks]
    figure.legend(handles=handles, loc="outside lower center", ncols=4, fontsize="small")
    path = Path(path)
    with atomic_output(path) as stream:
        figure.savefig(stream, dpi=150, format="png")
    return path


def _family_bounds(axes, families: Sequence[str]) -> None:
    for position in range(1, len(families)):
        if families[position] != families[position - 1]:
            axes.axvline(position - 0.5, color="black", lw=0.6)


def _errors_at(table: Mapping[str, float] | None, bits: int) -> float:
    return float("nan") if not table or str(bits) not in table else table[str(bits)]


def plot_sensitivity(
    allocation: Allocation,
    importance: Mapping[str, LayerImportance],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Why each layer got its width, in network order: (1) weight and input bits; (2) what the allocation
    weighs a layer's error by (Eq. 4's importance, and the downstream gain where measured); (3) each layer's
    measured relative output error (for `error: mask`, its mask KL) at its allocated width against the
    uniform width (weights and inputs), where measured. A layer whose error rose far above its neighbours' at a low width is where a mixed row
    loses, and the picture shows it next to the weight the allocation gave it."""
    names = list(allocation.names)
    families = [module_family(name) for name in names]
    colours = {family: f"C{i}" for i, family in enumerate(dict.fromkeys(families))}
    layers = [importance[name] for name in names]
    positions = range(len(names))
    uniform = round(allocation.target_avg)
    measured = any(layer.weight_errors for layer in layers)
    figure = Figure(figsize=(max(9.0, 0.06 * len(names)), 8.0 if measured else 5.5), layout="constrained")
    panels = figure.subplots(3 if measured else 2, 1, sharex=True)
    bits_axes, weight_axes = panels[0], panels[1]
    bits_axes.bar(positions, allocation.bits, width=1.0, color=[colours[f] for f in families], lw=0)
    bits_axes.step(
        positions, allocation.act_bits or allocation.bits, "k-", where="mid", lw=0.8, label="input bits"
    )
    bits_axes.set(
        ylabel="bits (bars: weights)",
        yticks=sorted(set(allocation.bits) | set(allocation.act_bits)),
        ylim=(max(min(allocation.bits) - 1, 0), max(allocation.bits) + 0.5),
        title=title
        or f"{allocation.method}, error {allocation.error}: W {allocation.average_bits:.2f} / "
        f"A {allocation.act_average_bits:.2f} bits",
    )
    bits_axes.legend(loc="upper right", fontsize="small")
    weight_axes.plot(
        positions, [layer.score for layer in layers], "k.", ms=3, label="importance $S_l$ (Eq. 4)"
    )
    gains = [layer.gain for layer in layers]
    if any(g is not None for g in gains):
        weight_axes.plot(
            positions,
            [float("nan") if g is None else g for g in gains],
            "r.",
            ms=3,
            label="downstream gain $g_l$",
        )
    weight_axes.set(yscale="log", ylabel="cost weight")
    weight_axes.legend(loc="upper right", fontsize="small")
    if measured:
        error_axes = panels[2]
        at_masks = allocation.error == "mask"
        for kind, style, bits in (("weight", "o", allocation.bits), ("act", "^", allocation.act_bits)):
            tables = [getattr(layer, f"{kind}_mask_kl" if at_masks else f"{kind}_errors") for layer in layers]
            label = "weights" if kind == "weight" else "inputs"
            error_axes.plot(
                positions,
                [_errors_at(t, b) for t, b in zip(tables, bits or allocation.bits, strict=True)],
                style,
                ms=3,
                mfc="none",
                label=f"{label} at allocated bits",
            )
            error_axes.plot(
                positions,
                [_errors_at(t, uniform) for t in tables],
                style,
                ms=2,
                alpha=0.4,
                label=f"{label} at {uniform} bits",
            )
        error_axes.set(yscale="log", ylabel="mask KL, layer alone" if at_masks else "relative output error")
        error_axes.legend(loc="upper right", fontsize="small", ncols=2)
    for axes in panels:
        _family_bounds(axes, families)
    panels[-1].set(xlabel="layer (network order)", xlim=(-0.5, len(names) - 0.5))
    handles = [Patch(color=colour, label=family) for family, colour in colours.items()]
    figure.legend(handles=handles, loc="outside lower center", ncols=4, fontsize="small")
    path = Path(path)
    with atomic_output(path) as stream:
        figure.savefig(stream, dpi=130, format="png")
    return path
