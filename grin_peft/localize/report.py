"""What a localization chose and why: densities per module and layer, score summary, budget, settings, timings."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")

SCORE_QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)


def split_module_name(name: str) -> tuple[int | None, str]:
    """(layer index, module type) from a module name: ``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``).

    The type keeps everything after the layer index, so GPT-2's ``attn.c_proj`` and ``mlp.c_proj`` stay apart.
    Names without a numbered layer (plain torch models) have no layer and are their own type.
    """
    match = _LAYER.match(name)
    if match is None:
        return None, name
    return int(match.group(2)), match.group(3)


@dataclass
class ModuleDensity:
    """Selected entries of one targeted module."""

    name: str
    layer: int | None
    type: str
    numel: int
    selected: int

    @property
    def density(self) -> float:
        return self.selected / self.numel if self.numel else 0.0


@dataclass
class LocalizationReport:
    """The outcome of ``model.localize``: where the budget went and how it was chosen.

    ``mass`` is the share of the forget (and retain) statistic behind the score that the selected entries hold: a
    useful selection holds far more of the forget mass than its density, and little of the retain mass.
    """

    adapter_name: str
    score: str
    settings: dict[str, Any]
    budget: dict[str, Any]
    modules: list[ModuleDensity]
    score_quantiles: dict[str, float] = field(default_factory=dict)
    score_threshold: float | None = None
    mass: dict[str, float | None] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    def _group(self, key: str) -> dict[str, dict[str, float]]:
        groups: dict[str, list[int]] = {}
        for m in self.modules:
            value = getattr(m, key)
            if value is None:
                continue
            entry = groups.setdefault(str(value), [0, 0])
            entry[0] += m.selected
            entry[1] += m.numel
        return {k: {"selected": s, "numel": n, "density": s / n if n else 0.0} for k, (s, n) in groups.items()}

    @property
    def per_layer(self) -> dict[str, dict[str, float]]:
        """Selected/targeted entries and density per layer index (modules without a layer left out)."""
        return dict(sorted(self._group("layer").items(), key=lambda kv: int(kv[0])))

    @property
    def per_type(self) -> dict[str, dict[str, float]]:
        """Selected/targeted entries and density per module type (q_proj, mlp.down_proj, ...)."""
        return self._group("type")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for module, raw in zip(self.modules, out["modules"]):
            raw["density"] = module.density
        out["per_layer"] = self.per_layer
        out["per_type"] = self.per_type
        return out

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the report as JSON (atomically: a crash never leaves a truncated file)."""
        from ..delta_file import atomic_write_text

        atomic_write_text(json.dumps(self.to_dict(), indent=2), os.fspath(path))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LocalizationReport:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
        raw.pop("per_layer", None)
        raw.pop("per_type", None)
        raw["modules"] = [ModuleDensity(**{k: v for k, v in m.items() if k != "density"}) for m in raw["modules"]]
        return cls(**raw)

    def summary(self) -> str:
        """A short human-readable summary."""
        lines = [
            f"GRIN localization ({self.score}) of adapter '{self.adapter_name}': "
            f"{self.budget['entries']} of {self.budget['targeted']} entries "
            f"(density {self.budget['entries'] / self.budget['targeted']:.3g})",
        ]
        if self.mass.get("forget") is not None:
            retain = self.mass.get("retain")
            lines.append(
                f"selected share of forget statistic {self.mass['forget']:.3g}"
                + (f", of retain statistic {retain:.3g}" if retain is not None else "")
            )
        for key, row in self.per_type.items():
            lines.append(f"  {key}: density {row['density']:.3g} ({row['selected']}/{row['numel']})")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save the density of selected weights per module as a figure (PNG, PDF, SVG by extension).

        Layered models get a heatmap of layers x module types, as in the paper's "density of selected weights in
        each module" figure; modules outside numbered layers get a bar chart. Uses matplotlib's Agg canvas directly,
        so the caller's pyplot backend is left alone.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layered = [m for m in self.modules if m.layer is not None]
        loose = [m for m in self.modules if m.layer is None]
        panels = int(bool(layered)) + int(bool(loose))
        types = list(dict.fromkeys(m.type for m in layered))
        layers = sorted({m.layer for m in layered})
        width = max(6.0, 0.9 * len(types) + 2.5) if layered else 7.0
        height = (max(3.0, 0.35 * len(layers) + 1.8) if layered else 0) + (3.5 if loose else 0)
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
        density = self.budget["entries"] / self.budget["targeted"]
        title = f"Density of selected weights ({self.score}, total {density:.2g})"
        if layered:
            import numpy as np

            grid = np.full((len(layers), len(types)), np.nan)
            counts = np.zeros((len(layers), len(types), 2))
            for m in layered:
                i, j = layers.index(m.layer), types.index(m.type)
                counts[i, j] += (m.selected, m.numel)
            filled = counts[..., 1] > 0
            grid[filled] = counts[..., 0][filled] / counts[..., 1][filled]
            ax = axes[0]
            image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(layers)), [str(v) for v in layers], fontsize=8)
            ax.set_xlabel("module")
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=10)
            fig.colorbar(image, ax=ax, label="selected fraction")
        if loose:
            ax = axes[-1]
            ax.bar(range(len(loose)), [m.density for m in loose])
            ax.set_xticks(range(len(loose)), [m.name for m in loose], rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("selected fraction")
            if not layered:
                ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
