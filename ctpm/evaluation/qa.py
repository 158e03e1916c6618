"""What a physicist checks by eye before a CT-based perfusion map goes into a plan.

- ``<id>_qa.png`` per patient: axial and coronal slices through the centre of the lungs, a sagittal
  one through the right lung,
  the CT in a lung window, the perfusion as a colour wash inside the lungs, the outlines of the
  high (orange) and low (blue) functional volumes, the SD map of an ensemble in a second row, and a
  table of the volumes (mL) and mean perfusion of each lung (and lobe, with a lobe map).
- ``index.html`` over every patient of a prediction folder: one static page with relative links
  to the pictures and the NIfTI maps, opened from the file system (no server, no script).

Slices are shown in radiological convention: the patient's right on the image's left, anterior
up on the axial slice, superior up on the others, with the voxels' true aspect ratio. Arrays are
viewed in RAS order through nibabel's orientation tools (views, no copy of a 512^2 CT).
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctpm.data.io import atomic_write
from ctpm.data.lungs import LEFT, RIGHT
from ctpm.evaluation.stats import LOBES

#: Lobe labels of a lobe map (design card): 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL.
LOBE_LABELS = {i + 1: name for i, name in enumerate(LOBES)}
LOW, HIGH = 1, 2  # labels of the functional-volume map (ctpm.lightning.predictor)
LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500
QA_DPI = 80


@dataclass
class QaInput:
    """One patient's maps on the CT grid (I, J, K) with its RAS `affine`."""

    patient_id: str
    ct_hu: np.ndarray
    perfusion: np.ndarray
    functional: np.ndarray
    lungs: np.ndarray  # 1 right, 2 left
    affine: np.ndarray
    std: np.ndarray | None = None
    lobes: np.ndarray | None = None  # on the CT grid, 0 outside

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def qa_table(q: QaInput) -> dict[str, float]:
    """Volumes (mL) and mean perfusion of each lung, of both, of the high and low functional volumes
    and, with a lobe map, of each lobe (a lobe's voxels inside the lungs)."""
    out: dict[str, float] = {}
    regions = {"lungs": q.lungs > 0, "right": q.lungs == RIGHT, "left": q.lungs == LEFT}
    if q.lobes is not None:
        regions.update({name: (q.lobes == label) & (q.lungs > 0) for label, name in LOBE_LABELS.items()})
    for name, sel in regions.items():
        n = int(np.count_nonzero(sel))
        out[f"volume_ml_{name}"] = n * q.voxel_ml
        out[f"mean_perfusion_{name}"] = float(q.perfusion[sel].mean(dtype=np.float64)) if n else float("nan")
    out["high_ml"] = int(np.count_nonzero(q.functional == HIGH)) * q.voxel_ml
    out["low_ml"] = int(np.count_nonzero(q.functional == LOW)) * q.voxel_ml
    return out


def _ras_views(q: QaInput) -> tuple[dict[str, np.ndarray | None], np.ndarray]:
    """Every map viewed in RAS axis order (views), and the voxel size (mm) along x, y, z."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(q.affine)
    to_ras = nio.ornt_transform(ornt, nio.axcodes2ornt(("R", "A", "S")))
    spacing = np.linalg.norm(q.affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    maps = {"ct": q.ct_hu, "perfusion": q.perfusion, "functional": q.functional, "lungs": q.lungs, "std": q.std}
    return {k: (None if v is None else nio.apply_orientation(np.asarray(v), to_ras)) for k, v in maps.items()}, spacing


def _planes(a: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal planes of a RAS-ordered array as images (row 0 at the bottom with
    origin="lower"): the patient's right on the left, anterior / superior up."""
    i, j, k = centre
    return [a[::-1, :, k].T, a[::-1, j, :].T, a[i, :, :].T]


def qa_figure(q: QaInput, *, threshold: float = 0.66) -> bytes:
    """The QA picture of one patient as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    views, sp = _ras_views(q)
    lungs = views["lungs"] > 0
    idx = np.argwhere(lungs) if lungs.any() else np.argwhere(np.ones(lungs.shape, bool))
    centre = [int(round(float(v))) for v in idx.mean(0)]
    # the sagittal plane through the centre of the lungs would cut the mediastinum: take the right lung's
    right = np.argwhere(views["lungs"] == RIGHT)
    if len(right):
        centre[0] = int(round(float(right[:, 0].mean())))
    # aspect per plane: (column spacing, row spacing) of the image
    extents = [(sp[0], sp[1]), (sp[0], sp[2]), (sp[1], sp[2])]
    names = ["axial", "coronal", "sagittal"]
    rows = 2 if views["std"] is not None else 1
    fig = plt.figure(figsize=(13.0, 3.4 * rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(rows, 4, width_ratios=[1, 1, 1, 0.9])
    ct_planes = _planes(views["ct"], centre)
    lung_planes = _planes(lungs, centre)
    func_planes = _planes(views["functional"], centre)
    vmax_sd = None
    try:
        for r, (key, cmap, label) in enumerate([("perfusion", "jet", "perfusion (1 = normal lung)"),
                                                ("std", "magma", "SD over models")][:rows]):
            planes = _planes(views[key], centre)
            if key == "std":
                inside = views["std"][lungs]
                vmax_sd = float(np.percentile(inside, 99)) if inside.size else 1.0
            for c, (ct2, lung2, func2, p2) in enumerate(zip(ct_planes, lung_planes, func_planes, planes)):
                ax = fig.add_subplot(grid[r, c])
                w, h = ct2.shape[1] * extents[c][0], ct2.shape[0] * extents[c][1]
                ext = (0, w, 0, h)
                ax.imshow(ct2, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], origin="lower",
                          extent=ext, interpolation="nearest")
                wash = np.ma.masked_where(~lung2, p2)
                im = ax.imshow(wash, cmap=cmap, vmin=0.0, vmax=(1.2 if key == "perfusion" else max(vmax_sd, 1e-6)),
                               alpha=0.55, origin="lower", extent=ext, interpolation="nearest")
                if key == "perfusion":
                    for label_value, colour in ((HIGH, "orange"), (LOW, "deepskyblue")):
                        m = (func2 == label_value).astype(float)
                        if m.any() and not m.all():
                            ax.contour(m, levels=[0.5], colors=[colour], linewidths=0.8, origin="lower", extent=ext)
                ax.set_title(f"{names[c]}" + (" (R on the left)" if c < 2 else ", right lung (A on the right)"),
                             fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            fig.colorbar(im, ax=fig.axes[-3:], shrink=0.8, label=label, location="right")
        ax = fig.add_subplot(grid[:, 3])
        ax.axis("off")
        ax.text(0.0, 1.0, _table_text(qa_table(q), threshold), family="monospace", fontsize=9, va="top",
                transform=ax.transAxes)
        fig.suptitle(f"{q.patient_id}: CT-based perfusion; outlines: high (orange) / low (blue) functional volume "
                     f"at {threshold:g}", fontsize=11)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=QA_DPI)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _table_text(t: Mapping[str, float], threshold: float) -> str:
    lines = [f"{'region':<8}{'volume mL':>11}{'mean perf':>11}"]
    for name in ["lungs", "right", "left", *LOBES]:
        if f"volume_ml_{name}" in t:
            mean = t[f"mean_perfusion_{name}"]
            lines.append(f"{name:<8}{t[f'volume_ml_{name}']:>11.1f}{mean:>11.3f}" if mean == mean
                         else f"{name:<8}{t[f'volume_ml_{name}']:>11.1f}{'-':>11}")
    lines += ["", f"high (>= {threshold:g}) {t['high_ml']:9.1f} mL", f"low  (<  {threshold:g}) {t['low_ml']:9.1f} mL"]
    return "\n".join(lines)


def write_qa(q: QaInput, out: str | Path, *, threshold: float = 0.66) -> Path:
    """``<out>/<id>_qa.png`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write(out / f"{q.patient_id}_qa.png", qa_figure(q, threshold=threshold))


def write_index(out: str | Path, rows: Sequence[Mapping[str, Any]], *, title: str = "ctpm-predict",
                models: Sequence[str] = ()) -> Path:
    """``<out>/index.html``: a table of every patient (picture, volumes, mean perfusion, links to the
    maps), relative links only, no script, so that it opens from a folder or a copied USB stick."""
    out = Path(out)

    def link(name: str) -> str:
        return f'<a href="{html.escape(name)}">{html.escape(name)}</a>' if (out / name).exists() else ""

    body = []
    for r in rows:
        pid = str(r["patient_id"])
        files = [f"{pid}.nii.gz", f"{pid}_functional.nii.gz", f"{pid}_lungs.nii.gz", f"{pid}_std.nii.gz",
                 f"{pid}_rtstruct.dcm"]
        numbers = "".join(f"<td>{_fmt(r.get(k))}</td>" for k in
                          ("volume_ml_right", "volume_ml_left", "high_ml", "low_ml",
                           "mean_perfusion_right", "mean_perfusion_left"))
        picture = f"{pid}_qa.png"
        body.append(
            f'<tr id="{html.escape(pid)}"><td><b>{html.escape(pid)}</b><br>'
            + "<br>".join(x for x in map(link, files) if x)
            + f'</td>{numbers}<td><a href="{html.escape(picture)}"><img src="{html.escape(picture)}" '
              f'alt="QA picture of {html.escape(pid)}" width="640"></a></td></tr>')
    model_list = "".join(f"<li><code>{html.escape(str(m))}</code></li>" for m in models)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #fff; color: #111; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #bbb; padding: 4px 8px; vertical-align: top; }}
th {{ background: #e8eef6; }} td:not(:first-child):not(:last-child) {{ text-align: right; }}
</style></head><body>
<h1>{html.escape(title)}: {len(rows)} patient(s)</h1>
<p>CT-based perfusion maps (1 = normal-functioning lung). Outlines: high (orange) and low (blue) functional
volumes. Check every picture before a map is used in a plan: lungs complete, no map outside them.</p>
<p>Models averaged:</p><ul>{model_list}</ul>
<table><tr><th>patient, files</th><th>right lung mL</th><th>left lung mL</th><th>high mL</th><th>low mL</th>
<th>mean perfusion right</th><th>mean perfusion left</th><th>QA picture</th></tr>
{chr(10).join(body)}
</table></body></html>
"""
    return atomic_write(out / "index.html", page)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    return "" if f != f else f"{f:.1f}" if abs(f) >= 10 else f"{f:.3f}"
