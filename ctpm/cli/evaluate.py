"""ctpm-evaluate: metrics.csv, summary.json, figures and report.md for a prediction set."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.data.io import moved, staged_outputs
from ctpm.data.manifest import load_manifest
from ctpm.errors import CtpmError


def run(cfg: DictConfig) -> dict:
    from ctpm.evaluation.evaluate import evaluate
    from ctpm.evaluation.report import write_report

    out = Path(cfg.out)
    if (out / "metrics.csv").exists() and not cfg.overwrite:
        raise CtpmError("an evaluation exists already here; choose another out= or pass overwrite=true", path=out)
    manifest = load_manifest(cfg.manifest, require_spect=True)
    predictions = OmegaConf.to_container(cfg.predictions) if OmegaConf.is_list(cfg.predictions) else cfg.predictions
    baseline = cfg.baseline_predictions
    if OmegaConf.is_list(baseline):
        baseline = OmegaConf.to_container(baseline)
    prep = OmegaConf.to_container(cfg.evaluation, resolve=True)
    cache = None
    if cfg.get("cache"):
        from ctpm.data.cache import PreprocessCache, select_config

        cache = PreprocessCache(cfg.cache, select_config(cfg.cache, explicit=_explicit_keys(prep),
                                                         hashes=_provenance_hashes(predictions)))
    result = evaluate(manifest, predictions, cfg=prep, cache=cache, cohort=cfg.cohort,
                      baseline_predictions=baseline, density_baseline=bool(cfg.density_baseline),
                      density_fit_cohort=cfg.density_fit_cohort, threshold=float(cfg.threshold),
                      splits=cfg.splits, progress=bool(cfg.progress),
                      min_coverage=float(cfg.min_coverage),
                      geometry_prior=bool(cfg.geometry_prior), smooth_density=bool(cfg.smooth_density),
                      default_spect_fwhm_mm=float(cfg.default_spect_fwhm_mm), min_defect_ml=float(cfg.min_defect_ml),
                      ceilings=bool(cfg.ceilings))
    with staged_outputs(out) as stage:  # the report's files all together, or none (a failed figure)
        files = write_report(result, stage, labels=OmegaConf.to_container(cfg.labels), title=cfg.title,
                             threshold=float(cfg.threshold), bootstrap=OmegaConf.to_container(cfg.bootstrap))
    files = moved(files, stage, out)
    rows = result["rows"]["model"]
    mean_r = sum(r["spearman_r"] for r in rows) / len(rows)
    print(f"ctpm-evaluate: {len(rows)} patients, mean Spearman R {mean_r:.4f} -> {files.get('report', out)}")
    if result["missing"]:
        print(f"ctpm-evaluate: warning: {len(result['missing'])} patient(s) without prediction: {', '.join(result['missing'])}")
    return result


def _explicit_keys(prep: dict) -> dict:
    """The preprocessing options set on the command line (evaluation.<key>=...): those that differ
    from conf/preprocessing/default.yaml."""
    default = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "preprocessing" / "default.yaml"), resolve=True)
    return {k: v for k, v in prep.items() if default.get(k) != v}


def _provenance_hashes(predictions) -> list[str]:
    """The preprocessing hashes the prediction folders record (provenance.json, written beside the
    maps by the training's prediction writer and by ctpm-predict)."""
    import json

    dirs = predictions if isinstance(predictions, list) else [predictions]
    out = []
    for d in dirs:
        for folder in (sorted(Path().glob(str(d))) if any(c in str(d) for c in "*?[") else [Path(d)]):
            f = folder / "provenance.json"
            try:
                h = json.loads(f.read_text()).get("preprocessing_hash") if f.is_file() else None
            except (OSError, ValueError):
                h = None
            if h:
                out.append(str(h))
    return out


@command_line("ctpm-evaluate")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@user_errors("ctpm-evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
