"""ctpm-predict: perfusion maps and functional volumes from CTs and trained checkpoints."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, user_errors
from ctpm.data.manifest import load_manifest
from ctpm.errors import CtpmError
from ctpm.provenance import resolve_checkpoints


def checkpoints(spec) -> list[Path]:
    """ckpt= as checkpoint files: each entry a file, a run folder or a fold multirun folder
    (``ctpm.provenance.resolve_checkpoints``)."""
    entries = list(spec) if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]
    out: list[Path] = []
    for entry in entries:
        out += [c for c in resolve_checkpoints(str(entry)) if c not in out]
    if not out:
        raise CtpmError("give at least one checkpoint: ckpt=PATH, ckpt=RUN_DIR or ckpt=[PATH,PATH]")
    return out


def _patients(cfg: DictConfig) -> list[dict]:
    if bool(cfg.ct) == bool(cfg.manifest):
        raise CtpmError("give either ct=PATH or manifest=CSV")
    if cfg.ct:
        ct = Path(cfg.ct)
        pid = cfg.patient_id or re.sub(r"[^A-Za-z0-9._-]", "_", ct.name.split(".nii")[0]).strip("._") or "patient"
        p = {"patient_id": pid, "ct": ct}
        if cfg.lung_mask:
            p["lung_mask"] = Path(cfg.lung_mask)
        return [p], {pid: Path(cfg.lobes)} if cfg.lobes else {}
    m = load_manifest(cfg.manifest, require_spect=False, cohort=cfg.cohort)
    patients = [{"patient_id": p.patient_id, "ct": p.ct, **({"lung_mask": p.lung_mask} if p.lung_mask else {})}
                for p in m]
    return patients, {p.patient_id: p.lobes for p in m if p.lobes is not None}


def _qa(pred, ct_path: Path, lobes_path: Path | None, out: Path, threshold: float) -> dict:
    """<id>_qa.png of one prediction; returns its table (volumes, mean perfusion per lung / lobe)."""
    from ctpm.data.io import load_image
    from ctpm.evaluation.qa import QaInput, qa_table, write_qa
    from ctpm.geometry import Grid, resample_labels

    ct = load_image(ct_path, kind="ct", patient=pred.patient_id)
    lobes = None
    if lobes_path is not None:
        lv = load_image(lobes_path, kind="label", patient=pred.patient_id)
        lobes = resample_labels(lv.array, lv.grid, Grid(pred.affine, pred.functional.shape))
    q = QaInput(pred.patient_id, ct.array, pred.perfusion, pred.functional, pred.lungs, pred.affine,
                std=pred.std, lobes=lobes)
    write_qa(q, out, threshold=threshold)
    return qa_table(q)


def run(cfg: DictConfig) -> list[dict]:
    from ctpm.batch import run_batch
    from ctpm.lightning.predictor import Predictor, write_prediction

    out = Path(cfg.out)
    patients, lobes = _patients(cfg)
    existing = [p["patient_id"] for p in patients if (out / f"{p['patient_id']}.nii.gz").exists()]
    if existing and not cfg.overwrite:
        raise CtpmError(f"{len(existing)} prediction(s) exist already (e.g. {existing[0]}.nii.gz); "
                        "choose another out= or pass overwrite=true", path=out)
    ckpts = checkpoints(cfg.ckpt)
    if cfg.dicom_identity not in ("anonymous", "copy"):
        raise CtpmError(f"dicom_identity must be anonymous or copy, not {cfg.dicom_identity!r}")
    predictor = Predictor([str(c) for c in ckpts], device=cfg.device, flip_tta=bool(cfg.flip_tta),
                          threshold=float(cfg.threshold), preprocessing=OmegaConf.to_container(cfg.preprocessing))
    print(f"ctpm-predict: {len(ckpts)} model(s): " + ", ".join(str(c) for c in ckpts))

    def one(p: dict) -> dict:
        pred = predictor.predict(p)
        write_prediction(pred, out)
        if cfg.dicom:
            from ctpm.data.dicom_export import write_prediction_dicom

            write_prediction_dicom(p["ct"], pred.perfusion, pred.functional, pred.affine, out, pred.patient_id,
                                   lungs=pred.lungs, identity=str(cfg.dicom_identity))
        inside = pred.functional > 0
        row = {"patient_id": pred.patient_id, **{k: round(v, 2) for k, v in pred.volumes_ml().items()},
               "mean_perfusion": round(float(pred.perfusion[inside].mean()) if inside.any() else 0.0, 4)}
        if cfg.qa:
            table = _qa(pred, Path(p["ct"]), lobes.get(pred.patient_id), out, float(cfg.threshold))
            row.update({k: round(v, 4) for k, v in table.items() if k not in row and not k.endswith("_lungs")})
        return row

    result = run_batch(one, patients, progress=bool(cfg.progress) and len(patients) > 1, desc="ctpm-predict")
    if len(patients) == 1:
        result.raise_if_failed("predicted")
    rows = list(result.ok.values())
    if rows:
        from ctpm.lightning.callbacks import write_provenance

        write_provenance(out, predictor.cfg, checkpoints=[str(Path(c).absolute()) for c in ckpts])
        with (out / "predictions.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
        if cfg.qa:
            from ctpm.evaluation.qa import write_index

            write_index(out, rows, models=[str(c) for c in ckpts])
    print(f"ctpm-predict: {len(rows)} patient(s) with {len(ckpts)} model(s) on {predictor.device} -> {out}")
    result.raise_if_failed("predicted")
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
@user_errors("ctpm-predict")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
