"""ctpm-preprocess: a manifest into the preprocessing cache (and, with roundtrip=true, the ceiling).

On a cluster, a SLURM array fills one cache, each task one shard of the manifest's patients
(``shard=K/N``, a deterministic partition: no two tasks write the same entry); ``check=true``
afterwards reports the patients still missing.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.data.io import atomic_write
from ctpm.data.manifest import load_manifest


def run(cfg: DictConfig) -> dict[str, str]:
    manifest = load_manifest(cfg.manifest, require_spect=True, cohort=cfg.cohort)
    # imported after the manifest is checked: a bad manifest is reported in a second, not after
    # torch and MONAI have loaded
    from ctpm.data.cache import PreprocessCache, parse_shard, shard_patients

    cache = PreprocessCache(cfg.out, cfg.preprocessing)
    if cfg.get("check", False):
        return check(cache, manifest.patients)
    shard = parse_shard(cfg.get("shard"))
    patients = manifest.patients if shard is None else shard_patients(manifest.patients, *shard)
    suffix = "" if shard is None else f"-shard{shard[0]}of{shard[1]}"
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {len(patients)} of {len(manifest.patients)} patients")
    result = cache.ensure(
        patients, workers=int(cfg.workers), progress=bool(cfg.progress), roundtrip=bool(cfg.roundtrip)
    )
    counts: dict[str, int] = {}
    for status, _ in result.ok.values():
        counts[status] = counts.get(status, 0) + 1
    if result.failed:
        counts["failed"] = len(result.failed)
    print(f"cache {cache.root} (config {cache.key}): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    rt = {pid: r for pid, (_, r) in result.ok.items() if r is not None}
    if cfg.roundtrip and rt:
        path = Path(cfg.out) / f"roundtrip{suffix}.csv"
        fh = io.StringIO(newline="")
        w = csv.writer(fh)
        w.writerow(["patient_id", "spearman_r"])
        for p in patients:
            if p.patient_id in rt:
                w.writerow([p.patient_id, f"{rt[p.patient_id]:.6f}"])
        atomic_write(path, fh.getvalue())
        vals = sorted(rt.values())
        print(f"roundtrip Spearman R (the ceiling at roi_size): min {vals[0]:.4f}, mean {sum(vals) / len(vals):.4f} -> {path}")
    if cache.cfg.register_spect != "none":  # the cohort's SPECT-to-CT transforms, one table
        from ctpm.data.registration import write_registration_table

        found = [cache.entry_dir(p.patient_id) / "registration.json" for p in patients]
        table = write_registration_table([json.loads(f.read_text()) for f in found if f.is_file()],
                                         Path(cfg.out) / f"registration{suffix}.csv")
        print(f"SPECT-to-CT registration ({cache.cfg.register_spect}) of {sum(f.is_file() for f in found)} patient(s) -> {table}")
    others = len(result.ok)
    result.raise_if_failed("preprocessed", note=f"the other {others} patient(s) are in the cache" if others else None)
    return {pid: status for pid, (status, _) in result.ok.items()}


def check(cache, patients) -> dict[str, str]:
    """check=true: build nothing; report the manifest's patients whose entry is missing, stale or
    damaged (after the shards of an array have run) as an error naming them, else a summary."""
    problems = {p.patient_id: why for p in patients if (why := cache.problem(p.patient_id, patient=p)) is not None}
    if problems:
        from ctpm.errors import CtpmError

        lines = "\n  ".join(f"{pid}: {why}" for pid, why in sorted(problems.items()))
        raise CtpmError(f"{len(problems)} of {len(patients)} patients are not in the cache {cache.root} "
                        f"(config {cache.key}); rerun their shard, or ctpm-preprocess without shard=:\n  {lines}")
    print(f"cache {cache.root} (config {cache.key}): all {len(patients)} patients present")
    return {p.patient_id: "cached" for p in patients}


@command_line("ctpm-preprocess")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="preprocess")
@user_errors("ctpm-preprocess")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
