"""Pictures for the compliance report: matplotlib charts and attribution-overlay thumbnails, each
returned as a ``data:`` URI so the page is one self-contained file.

Charts use matplotlib's Agg backend (no display, no network) and small figures at a modest DPI:
a report of any run size holds a bounded number of them. Thumbnails are drawn with NumPy and
Pillow (a colormap lookup and a per-pixel alpha blend), JPEG-compressed, a few kilobytes each.
Every function takes plain figures from the report's summary and returns a string.
"""
import base64
import io
import math
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on workers, CI machines or launchers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

THUMBNAIL_PX = 128
_DPI = 90
# Inferno runs dark → yellow with no green or cyan in it, so the mask outline stays visible.
_COLORMAP = matplotlib.colormaps["inferno"]
_MASK_OUTLINE_RGB = (0, 255, 255)
# Opacity of the map over the image at the map's minimum and maximum: weak attribution lets the
# image show through, strong attribution covers it most.
_ALPHA_LOW, _ALPHA_HIGH = 0.05, 0.75
COLOUR_BAR_PX = (128, 10)


def _data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buffer.getvalue(), "image/png")


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- charts


def slice_metric_chart(metric: str, rows: Sequence[dict]) -> str:
    """Horizontal bars of one metric per slice (worst at the top), with CI whiskers if any.

    ``rows``: {"slice", "value", "ci_low", "ci_high"}; value None rows are left out."""
    rows = [r for r in rows if r.get("value") is not None]
    fig, ax = plt.subplots(figsize=(6.0, 0.35 * len(rows) + 0.9))
    labels = [_short(r["slice"], 36) for r in rows]
    values = [r["value"] for r in rows]
    positions = np.arange(len(rows))[::-1]
    ax.barh(positions, values, color="#4c78a8")
    errors = [(r["value"] - r["ci_low"], r["ci_high"] - r["value"]) for r in rows
              if r.get("ci_low") is not None and r.get("ci_high") is not None]
    if len(errors) == len(rows):
        ax.errorbar(values, positions, xerr=np.array(errors).T, fmt="none", ecolor="black",
                    capsize=3, linewidth=1)
    ax.set_yticks(positions, labels)
    low = min(values + [1.0])
    start = max(0.0, low - 0.1) if low > 0.2 else 0.0
    ax.set_xlim(start, max(1.0, max(values)) * 1.02)
    ax.set_xlabel(metric + (f" (the axis starts at {start:.2f})" if start else ""))
    ax.grid(axis="x", alpha=0.3)
    return _figure_uri(fig)


def layer_sweep_chart(rows: Sequence[dict]) -> str:
    """Mask energy over mask area (lift) and the pointing-game rate per layer, input side left.

    ``rows``: the "overall" rows of layer_sweep.parquet sorted by depth."""
    fig, ax = plt.subplots(figsize=(7.0, 3.2))
    x = np.arange(len(rows))
    lift = [r["energy"] / r["area"] if r.get("energy") is not None and r.get("area") else np.nan
            for r in rows]
    pointing = [r["pointing_game"] if r.get("pointing_game") is not None else np.nan for r in rows]
    ax.plot(x, lift, marker="o", color="#4c78a8", label="mask energy / mask area (lift)")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("lift (1 = no preference for the mask)")
    twin = ax.twinx()
    twin.plot(x, pointing, marker="s", color="#f58518", label="pointing game")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("pointing-game rate")
    ax.set_xticks(x, [_short(r["layer"], 18) for r in rows], rotation=45, ha="right")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax.set_xlabel("layer (input side → output side)")
    return _figure_uri(fig)


def importance_chart(metric: str, rows: Sequence[dict], limit: int = 20) -> str:
    """Bars of permutation importance with 95% intervals, most important at the top."""
    rows = sorted(rows, key=lambda r: -(r["importance"] or 0.0))[:limit]
    fig, ax = plt.subplots(figsize=(6.0, 0.3 * len(rows) + 0.9))
    positions = np.arange(len(rows))[::-1]
    values = np.array([r["importance"] or 0.0 for r in rows])
    low = np.array([r["ci_low"] if r.get("ci_low") is not None else v
                    for r, v in zip(rows, values)])
    high = np.array([r["ci_high"] if r.get("ci_high") is not None else v
                     for r, v in zip(rows, values)])
    ax.barh(positions, values, color="#54a24b")
    ax.errorbar(values, positions, xerr=np.vstack([values - low, high - values]).clip(0),
                fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(positions, [r["feature"] for r in rows])
    ax.set_xlabel(f"importance ({metric}; 95% interval)")
    ax.grid(axis="x", alpha=0.3)
    return _figure_uri(fig)


def patch_heatmap(metric: str, grid: Sequence[Sequence[Optional[float]]]) -> str:
    """The patch importances drawn over the image grid, each cell labelled with its value."""
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], float)
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(0.75 * cols + 1.8, 0.75 * rows + 0.6))
    image = ax.imshow(values, cmap="Reds", vmin=min(0.0, np.nanmin(values)))
    top = np.nanmax(values)
    for (r, c), v in np.ndenumerate(values):
        if not math.isnan(v):
            colour = "white" if top > 0 and v > 0.6 * top else "black"
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(cols), [f"c{c}" for c in range(cols)])
    ax.set_yticks(range(rows), [f"r{r}" for r in range(rows)])
    fig.colorbar(image, ax=ax, label=metric, fraction=0.046)
    return _figure_uri(fig)


def attention_grid(maps: Sequence[dict], grid: Sequence[int]) -> str:
    """Mean maps, a row per predicted class and a column per slice value, one colour scale per
    row so a row's slice values compare (a class whose maps are a single bright pixel would
    leave every other row black on one scale for all). The attention-region grid is drawn over
    each map and the cell of its peak outlined."""
    classes = list(dict.fromkeys(m["predicted_class"] for m in maps))
    slices = list(dict.fromkeys(m["slice"] for m in maps))
    fig, axes = plt.subplots(len(classes), len(slices), squeeze=False,
                             figsize=(2.1 * len(slices) + 1.0, 2.3 * len(classes)))
    for ax in axes.flat:
        ax.axis("off")
    for row, k in enumerate(classes):
        entries = [m for m in maps if m["predicted_class"] == k]
        top = max(float(np.max(m["map"])) for m in entries) or 1.0
        image = None
        for entry in entries:
            ax = axes[row, slices.index(entry["slice"])]
            image = _attention_map(ax, entry, grid, top)
        fig.colorbar(image, ax=list(axes[row]), fraction=0.02,
                     label=f"predicted {_short(str(entries[0]['class_name']), 16)}")
    return _figure_uri(fig)


def _attention_map(ax, entry: dict, grid: Sequence[int], top: float):
    values = np.asarray(entry["map"], float)
    height, width = values.shape
    ax.axis("on")
    image = ax.imshow(values, cmap=_COLORMAP, vmin=0.0, vmax=top, extent=(0, width, height, 0))
    for i in range(1, grid[0]):
        ax.axhline(i * height / grid[0], color="white", linewidth=0.5, alpha=0.6)
    for j in range(1, grid[1]):
        ax.axvline(j * width / grid[1], color="white", linewidth=0.5, alpha=0.6)
    if entry.get("peak_region"):
        r, c = (int(part[1:]) for part in entry["peak_region"].split("_"))
        ax.add_patch(Rectangle((c * width / grid[1], r * height / grid[0]), width / grid[1],
                               height / grid[0], fill=False, edgecolor="cyan", linewidth=1.5))
    ax.set_title(f"{_short(entry['slice'], 24)}\nn={entry['n']:,}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def sanity_chart(curves: Dict[str, List[dict]], judged_step: Dict[str, int],
                 threshold: float) -> str:
    """Spearman correlation with the original maps as layers are randomized, per method. The
    verdict judges one point per method, the fully randomized step: it is ringed, and the flag
    threshold is drawn at that step only (earlier points may lie above it without a flag)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    steps: Dict[int, str] = {}
    for method, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["step"])
        line, = ax.plot([r["step"] for r in rows], [r["spearman_mean"] for r in rows],
                        marker="o", label=method)
        judged = [r for r in rows if r["step"] == judged_step.get(method)]
        ax.scatter([r["step"] for r in judged], [r["spearman_mean"] for r in judged], s=160,
                   facecolors="none", edgecolors=line.get_color(), linewidths=1.5)
        steps.update({r["step"]: r.get("randomized_up_to") or str(r["step"]) for r in rows})
    ax.set_xticks(sorted(steps), [_short(f"…{steps[k]}", 16) for k in sorted(steps)],
                  rotation=30, ha="right")
    for step in sorted(set(judged_step.values())):
        ax.hlines(threshold, step - 0.4, step + 0.4, color="red", linewidth=2,
                  label=f"flag above {threshold:g} (judged step, ringed)")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("randomized from the output down to layer")
    ax.set_ylabel("Spearman ρ vs original map")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_uri(fig)


# --------------------------------------------------------------------------- thumbnails


def _resize(array: np.ndarray, size: tuple, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, resample))


def _fit(height: int, width: int, longest: int) -> tuple:
    """(width, height) with the longest side ``longest`` pixels."""
    scale = longest / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _gray_background(pixels: Optional[np.ndarray], size: tuple) -> np.ndarray:
    """The image as 8-bit RGB at ``size``; mid-grey when there is no image."""
    if pixels is None:
        return np.full((size[1], size[0], 3), 128, np.uint8)
    scaled = np.clip(pixels, 0, 255).astype(np.uint8)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return _resize(scaled, size, Image.BILINEAR)


def _mask_outline(mask: np.ndarray, size: tuple) -> np.ndarray:
    """Pixels on the border of the mask, at ``size``: the mask minus its 4-neighbour erosion."""
    small = _resize(mask.astype(np.uint8) * 255, size, Image.NEAREST) > 0
    inner = small.copy()
    inner[1:, :] &= small[:-1, :]
    inner[:-1, :] &= small[1:, :]
    inner[:, 1:] &= small[:, :-1]
    inner[:, :-1] &= small[:, 1:]
    return small & ~inner


def _blend(base: np.ndarray, values: np.ndarray, image_shown: bool) -> np.ndarray:
    """The map's colours over ``base``, each pixel as opaque as its value (0..1) is high."""
    colours = _COLORMAP(values)[..., :3] * 255
    if not image_shown:
        return colours
    alpha = (_ALPHA_LOW + (_ALPHA_HIGH - _ALPHA_LOW) * values)[..., None]
    return (1 - alpha) * base + alpha * colours


def overlay_thumbnail(pixels: Optional[np.ndarray], heatmap: np.ndarray,
                      mask: Optional[np.ndarray] = None, longest: int = THUMBNAIL_PX) -> str:
    """A JPEG data URI: the map (scaled to its own maximum, inferno colours) alpha-blended over
    the image, with the ground-truth mask's outline in cyan. ``pixels`` [H, W, C] in 0..255, or
    None to draw the map alone (when the image could not be re-read)."""
    height, width = (pixels.shape[:2] if pixels is not None else heatmap.shape)
    size = _fit(height, width, longest)
    base = _gray_background(pixels, size).astype(np.float32)
    peak = float(np.max(heatmap)) if heatmap.size else 0.0
    scaled = (heatmap / peak if peak > 0 else np.zeros_like(heatmap)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(scaled, mode="F").resize(size, Image.BILINEAR))
    out = np.clip(_blend(base, np.clip(smooth, 0, 1), pixels is not None), 0, 255)
    out = out.astype(np.uint8)
    if mask is not None:
        out[_mask_outline(mask, size)] = _MASK_OUTLINE_RGB
    buffer = io.BytesIO()
    Image.fromarray(out).save(buffer, format="JPEG", quality=80)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def colour_bar() -> str:
    """A PNG data URI of the thumbnails' colour scale, 0 (left) to the map's maximum (right)."""
    width, height = COLOUR_BAR_PX
    row = (_COLORMAP(np.linspace(0, 1, width))[:, :3] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(row[None], height, axis=0)).save(buffer, format="PNG")
    return _data_uri(buffer.getvalue(), "image/png")
