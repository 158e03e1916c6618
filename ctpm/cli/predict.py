"""ctpm-predict: perfusion maps and functional volumes from CTs and trained checkpoints."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.data.io import atomic_write, staged_outputs
from ctpm.data.manifest import check_patient_id, load_manifest
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
        if cfg.patient_id is not None:
            pid = check_patient_id(str(cfg.patient_id), source="patient_id=")
        else:
            pid = re.sub(r"[^A-Za-z0-9._-]", "_", ct.name.split(".nii")[0]).strip("._-")[:128] or "patient"
        p = {"patient_id": pid, "ct": ct}
        if cfg.lung_mask:
            p["lung_mask"] = Path(cfg.lung_mask)
        return [p], {pid: Path(cfg.lobes)} if cfg.lobes else {}
    m = load_manifest(cfg.manifest, require_spect=False, cohort=cfg.cohort)
    patients = [{"patient_id": p.patient_id, "ct": p.ct, **({"lung_mask": p.lung_mask} if p.lung_mask else {})}
                for p in m]
    return patients, {p.patient_id: p.lobes for p in m if p.lobes is not None}


# What ctpm-predict may change of a checkpoint's preprocessing: how the lungs are found. Everything
# else (grid, ROI size, windows, channels) is what the network was trained on.
PREDICT_TIME_PREPROCESSING = ("lung_backend", "lungmask_weights", "lung")


def preprocessing_overrides(node) -> dict:
    """The ``preprocessing`` block of conf/predict.yaml without its unset (null) keys."""
    given = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    if not isinstance(given, dict):
        raise CtpmError(f"preprocessing= must be a mapping such as {{lung_backend: lungmask}}, not {given!r}")
    given = {k: v for k, v in given.items() if v is not None}
    fixed = sorted(set(given) - set(PREDICT_TIME_PREPROCESSING))
    if fixed:
        raise CtpmError(f"preprocessing.{fixed[0]} cannot be changed at prediction time (the network was trained "
                        f"with the checkpoint's); only {', '.join(PREDICT_TIME_PREPROCESSING)} can")
    return given


def _check_inputs_are_not_outputs(patients: list[dict], lobes: dict, out: Path) -> None:
    """Refuse an out= where a patient's outputs would replace one of the inputs (ct=DIR/ct.nii.gz
    out=DIR patient_id=ct)."""
    inputs = {Path(f).resolve() for p in patients for k in ("ct", "lung_mask") if p.get(k) for f in [p[k]]}
    inputs |= {Path(f).resolve() for f in lobes.values() if f}
    for p in patients:
        pid = p["patient_id"]
        for name in (f"{pid}.nii.gz", f"{pid}_functional.nii.gz", f"{pid}_lungs.nii.gz", f"{pid}_std.nii.gz",
                     f"{pid}_qa.png", f"{pid}_rtstruct.dcm", f"{pid}_perfusion_dicom"):
            if (out / name).resolve() in inputs:
                raise CtpmError(f"out= would replace an input of patient {pid} ({name}); choose another out=",
                                path=out / name)


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
    _check_inputs_are_not_outputs(patients, lobes, out)
    ckpts = checkpoints(cfg.ckpt)
    if cfg.dicom_identity not in ("anonymous", "copy"):
        raise CtpmError(f"dicom_identity must be anonymous or copy, not {cfg.dicom_identity!r}")
    predictor = Predictor([str(c) for c in ckpts], device=cfg.device, flip_tta=bool(cfg.flip_tta),
                          threshold=float(cfg.threshold), preprocessing=preprocessing_overrides(cfg.preprocessing))
    print(f"ctpm-predict: {len(ckpts)} model(s): " + ", ".join(str(c) for c in ckpts))

    def one(p: dict) -> dict:
        if cfg.dicom:  # before the work: a NIfTI CT cannot give DICOM objects
            from ctpm.data.dicom_export import load_dicom_ct

            load_dicom_ct(p["ct"], patient=p["patient_id"])
        pred = predictor.predict(p)
        # every output of the patient, or none: written into a staging folder, moved into out= at the end
        with staged_outputs(out) as stage:
            write_prediction(pred, stage)
            if cfg.dicom:
                from ctpm.data.dicom_export import write_prediction_dicom

                write_prediction_dicom(p["ct"], pred.perfusion, pred.functional, pred.affine, stage, pred.patient_id,
                                       lungs=pred.lungs, identity=str(cfg.dicom_identity))
            inside = pred.functional > 0
            row = {"patient_id": pred.patient_id, **{k: round(v, 2) for k, v in pred.volumes_ml().items()},
                   "mean_perfusion": round(float(pred.perfusion[inside].mean()) if inside.any() else 0.0, 4)}
            if cfg.qa:
                table = _qa(pred, Path(p["ct"]), lobes.get(pred.patient_id), stage, float(cfg.threshold))
                row.update({k: round(v, 4) for k, v in table.items() if k not in row and not k.endswith("_lungs")})
        return row

    result = run_batch(one, patients, progress=bool(cfg.progress) and len(patients) > 1, desc="ctpm-predict")
    if len(patients) == 1:
        result.raise_if_failed("predicted")
    rows = list(result.ok.values())
    if rows:
        from ctpm.lightning.callbacks import write_provenance

        write_provenance(out, predictor.cfg, checkpoints=[str(Path(c).absolute()) for c in ckpts])
        fh = io.StringIO(newline="")
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
        atomic_write(out / "predictions.csv", fh.getvalue())
        if cfg.qa:
            from ctpm.evaluation.qa import write_index

            write_index(out, rows, models=[str(c) for c in ckpts])
    print(f"ctpm-predict: {len(rows)} patient(s) with {len(ckpts)} model(s) on {predictor.device} -> {out}")
    result.raise_if_failed("predicted")
    return rows


@command_line("ctpm-predict")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
@user_errors("ctpm-predict")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
