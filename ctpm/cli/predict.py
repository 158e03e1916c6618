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


def _patients(cfg: DictConfig) -> list[dict]:
    if bool(cfg.ct) == bool(cfg.manifest):
        raise CtpmError("give either ct=PATH or manifest=CSV")
    if cfg.ct:
        ct = Path(cfg.ct)
        pid = cfg.patient_id or re.sub(r"[^A-Za-z0-9._-]", "_", ct.name.split(".nii")[0]).strip("._") or "patient"
        p = {"patient_id": pid, "ct": ct}
        if cfg.lung_mask:
            p["lung_mask"] = Path(cfg.lung_mask)
        return [p]
    m = load_manifest(cfg.manifest, require_spect=False, cohort=cfg.cohort)
    return [{"patient_id": p.patient_id, "ct": p.ct, **({"lung_mask": p.lung_mask} if p.lung_mask else {})} for p in m]


def run(cfg: DictConfig) -> list[dict]:
    from ctpm.batch import run_batch
    from ctpm.lightning.predictor import Predictor, write_prediction

    out = Path(cfg.out)
    patients = _patients(cfg)
    existing = [p["patient_id"] for p in patients if (out / f"{p['patient_id']}.nii.gz").exists()]
    if existing and not cfg.overwrite:
        raise CtpmError(f"{len(existing)} prediction(s) exist already (e.g. {existing[0]}.nii.gz); "
                        "choose another out= or pass overwrite=true", path=out)
    ckpts = cfg.ckpt if OmegaConf.is_list(cfg.ckpt) else [cfg.ckpt]
    predictor = Predictor([str(c) for c in ckpts], device=cfg.device, flip_tta=bool(cfg.flip_tta),
                          threshold=float(cfg.threshold), preprocessing=OmegaConf.to_container(cfg.preprocessing))

    def one(p: dict) -> dict:
        pred = predictor.predict(p)
        write_prediction(pred, out)
        if cfg.dicom:
            from ctpm.data.dicom_export import write_prediction_dicom

            write_prediction_dicom(p["ct"], pred.perfusion, pred.functional, pred.affine, out, pred.patient_id)
        inside = pred.functional > 0
        return {"patient_id": pred.patient_id, **{k: round(v, 2) for k, v in pred.volumes_ml().items()},
                "mean_perfusion": round(float(pred.perfusion[inside].mean()) if inside.any() else 0.0, 4)}

    result = run_batch(one, patients, progress=bool(cfg.progress) and len(patients) > 1, desc="ctpm-predict")
    if len(patients) == 1:
        result.raise_if_failed("predicted")
    rows = list(result.ok.values())
    if rows:
        from ctpm.lightning.callbacks import write_provenance

        write_provenance(out, predictor.cfg, checkpoints=[str(c) for c in ckpts])
        with (out / "predictions.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"ctpm-predict: {len(rows)} patient(s) with {len(ckpts)} model(s) on {predictor.device} -> {out}")
    result.raise_if_failed("predicted")
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
@user_errors("ctpm-predict")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
