"""ctpm-preprocess: a manifest into the preprocessing cache (and, with roundtrip=true, the ceiling)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ctpm.cli._common import CONF_DIR, user_errors
from ctpm.data.manifest import load_manifest


def run(cfg: DictConfig) -> dict[str, str]:
    manifest = load_manifest(cfg.manifest, require_spect=True, cohort=cfg.cohort)
    # imported after the manifest is checked: a bad manifest is reported in a second, not after
    # torch and MONAI have loaded
    from ctpm.data.cache import PreprocessCache

    cache = PreprocessCache(cfg.out, cfg.preprocessing)
    result = cache.ensure(
        manifest.patients, workers=int(cfg.workers), progress=bool(cfg.progress), roundtrip=bool(cfg.roundtrip)
    )
    counts: dict[str, int] = {}
    for status, _ in result.ok.values():
        counts[status] = counts.get(status, 0) + 1
    if result.failed:
        counts["failed"] = len(result.failed)
    print(f"cache {cache.root} (config {cache.key}): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    rt = {pid: r for pid, (_, r) in result.ok.items() if r is not None}
    if cfg.roundtrip and rt:
        path = Path(cfg.out) / "roundtrip.csv"
        tmp = path.with_name(".roundtrip.csv.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "spearman_r"])
            for p in manifest.patients:
                if p.patient_id in rt:
                    w.writerow([p.patient_id, f"{rt[p.patient_id]:.6f}"])
        tmp.replace(path)
        vals = sorted(rt.values())
        print(f"roundtrip Spearman R (the ceiling at roi_size): min {vals[0]:.4f}, mean {sum(vals) / len(vals):.4f} -> {path}")
    if cache.cfg.register_spect != "none":  # the cohort's SPECT-to-CT transforms, one table
        from ctpm.data.registration import write_registration_table

        found = [cache.entry_dir(p.patient_id) / "registration.json" for p in manifest.patients]
        table = write_registration_table([json.loads(f.read_text()) for f in found if f.is_file()],
                                         Path(cfg.out) / "registration.csv")
        print(f"SPECT-to-CT registration ({cache.cfg.register_spect}) of {sum(f.is_file() for f in found)} patient(s) -> {table}")
    others = len(result.ok)
    result.raise_if_failed("preprocessed", note=f"the other {others} patient(s) are in the cache" if others else None)
    return {pid: status for pid, (status, _) in result.ok.items()}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="preprocess")
@user_errors("ctpm-preprocess")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
