"""ctpm-flart: MLD, Vx and their perfusion-weighted forms for a plan dose (FLART planning)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.data.io import moved, staged_outputs
from ctpm.data.manifest import load_manifest
from ctpm.errors import CtpmError


def run(cfg: DictConfig) -> dict:
    from ctpm.batch import BatchResult
    from ctpm.evaluation.flart import FlartSettings, flart_cohort, flart_patient, summarise, write_dvh, write_flart

    out = Path(cfg.out)
    if (out / "flart.csv").exists() and not cfg.overwrite:
        raise CtpmError("flart.csv exists already here; choose another out= or pass overwrite=true", path=out)
    single = [k for k in ("dose", "perfusion") if cfg[k]]
    if bool(cfg.manifest) == bool(single):
        raise CtpmError("give either dose=PATH perfusion=PATH lungs=PATH (or structures=RS.dcm lungs_roi=NAME "
                        "ct=CT; one patient) "
                        "or manifest=CSV predictions=DIR (a cohort)")
    settings = FlartSettings(thresholds_gy=tuple(OmegaConf.to_container(cfg.thresholds_gy)), dose_unit=cfg.dose_unit,
                             min_dose_coverage=float(cfg.min_dose_coverage),
                             min_perfusion_coverage=float(cfg.min_perfusion_coverage))
    if cfg.manifest:
        if not cfg.predictions:
            raise CtpmError("with manifest=, give predictions=DIR (the CT-based maps of ctpm-predict)")
        predictions = OmegaConf.to_container(cfg.predictions) if OmegaConf.is_list(cfg.predictions) else cfg.predictions
        result = flart_cohort(load_manifest(cfg.manifest, require_spect=False), predictions, lungs=cfg.lungs,
                              settings=settings, progress=bool(cfg.progress))
        rows, summary, curves, failed = result["rows"], result["summary"], result["dvh"], result["failed"]
    else:
        missing = [k for k in ("dose", "perfusion") if not cfg[k]]
        if missing or not (cfg.lungs or cfg.lobes or cfg.structures):
            raise CtpmError("one patient needs dose=PATH, perfusion=PATH and lungs=PATH (or lobes=PATH, or "
                            "structures=RS.dcm lungs_roi=NAME ct=CT)")
        rois = cfg.lungs_roi
        rois = OmegaConf.to_container(rois) if OmegaConf.is_config(rois) else rois
        curves = {}
        rows = [flart_patient(cfg.dose, cfg.perfusion, lungs=cfg.lungs, lobes=cfg.lobes, kind=cfg.perfusion_kind,
                              patient_id=str(cfg.patient_id), settings=settings, structures=cfg.structures,
                              lungs_roi=rois, ct=cfg.ct, registration=cfg.registration, dvh=curves)]
        summary = summarise(rows, settings.thresholds_gy)
        failed = []
    with staged_outputs(out) as stage:  # the table, summary and curves together, or none
        files = write_flart(rows, summary, stage, settings.thresholds_gy)
        if cfg.dvh:
            files.update(write_dvh(curves, stage))
    files = moved(files, stage, out)
    n = summary["n_patients"]
    print(f"ctpm-flart: {n} patient(s) -> {files['csv']}")
    # the good patients' table is written; the bad ones are reported together (status 2)
    BatchResult(ok={r["patient_id"]: None for r in rows}, failed=failed).raise_if_failed(
        "evaluated", note="the other patients are in flart.csv")
    return {"rows": rows, "summary": summary, "files": files}


@command_line("ctpm-flart")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="flart")
@user_errors("ctpm-flart")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
