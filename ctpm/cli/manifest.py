"""ctpm-manifest: a DICOM export into a cohort manifest (headers only) and a table of what was skipped."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.data.dicom_tree import PatientIds, build_plan, write_plan
from ctpm.errors import CtpmError


def run(cfg: DictConfig) -> tuple[Path, Path]:
    out = Path(cfg.out)
    if out.suffix.lower() != ".csv":
        raise CtpmError("out= must name the manifest file (…/manifest.csv), not a folder", path=out)
    if out.exists() and not cfg.overwrite:
        raise CtpmError("the manifest exists already; choose another out= or pass overwrite=true", path=out)
    ids = PatientIds(cfg.id_mode, salt=cfg.id_salt, mapping=cfg.id_mapping)
    plan = build_plan(cfg.dicom, out, cohort=cfg.cohort, institution=str(cfg.institution),
                      min_z_extent_mm=float(cfg.min_z_extent_mm), ids=ids, ct_only_rows=bool(cfg.ct_only_rows),
                      progress=bool(cfg.progress),
                      roi_names={k: [str(a) for a in v] for k, v in OmegaConf.to_container(cfg.roi_names).items()})
    if not plan.rows:
        reasons = Counter(s.reason for s in plan.skipped if s.series is None or s.series.modality == "CT")
        top = "; ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
        raise CtpmError(f"no patient could be put in the manifest: {top}", path=cfg.dicom)
    manifest, skipped = write_plan(plan, out, cfg.skipped)
    n_spect = sum(bool(r["spect"]) for r in plan.rows)
    n_rois = sum(bool(r.get("lobes") or r.get("lung_mask")) for r in plan.rows)
    print(f"ctpm-manifest: {len(plan.rows)} patient(s) ({n_spect} with SPECT, {len(plan.rows) - n_spect} CT-only, "
          f"{n_rois} with lung ROIs) -> {manifest}; {len(plan.skipped)} skipped -> {skipped}")
    return manifest, skipped


@command_line("ctpm-manifest")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="manifest")
@user_errors("ctpm-manifest")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
