"""The cohort manifest: one CSV row per patient, validated on load.

Columns (design card): ``patient_id, cohort, institution, ct, spect`` and the optional
``lung_mask, lobes, tumor_diameter_mm, spect_fwhm_mm`` (the SPECT's resolution, mm); synthetic
cohorts add ``perfusion`` (the truth) and ``dose``. Paths are relative to the manifest's folder; ``ct`` and ``spect`` are a NIfTI file or a
folder holding one DICOM series.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ctpm.data.io import atomic_write
from ctpm.errors import CtpmError

REQUIRED = ("patient_id", "cohort", "institution", "ct", "spect")
OPTIONAL_PATHS = ("lung_mask", "lobes", "perfusion", "dose", "oracle")
OPTIONAL = OPTIONAL_PATHS + ("tumor_diameter_mm", "spect_fwhm_mm")
COHORTS = ("noncancer", "cancer")
# Patient ids become file names of outputs: keep them to characters that are safe everywhere.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: no "/", "..", newline
ID_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"


def safe_id(pid: object) -> bool:
    """Whether `pid` can name files: the rule of ``check_patient_id``."""
    return isinstance(pid, str) and _SAFE_ID.fullmatch(pid) is not None


def check_patient_id(pid: object, *, source: str = "patient_id", path: str | Path | None = None) -> str:
    """`pid` when it may name output files (``<out>/<id>.nii.gz``, ``<cache>/<id>/``), else a
    CtpmError: every place where a name becomes a path goes through here, so an id such as
    ``../x`` or ``a/b`` never writes outside its folder."""
    if not safe_id(pid):
        raise CtpmError(f"{source} {pid!r} may only hold {ID_RULE} (it names output files)", path=path)
    return str(pid)


@dataclass(frozen=True)
class Patient:
    patient_id: str
    cohort: str
    institution: str
    ct: Path
    spect: Path | None
    lung_mask: Path | None = None
    lobes: Path | None = None
    perfusion: Path | None = None
    dose: Path | None = None
    oracle: Path | None = None  # synthetic cohorts: the perfusion rebuilt from the CT-visible causes only
    tumor_diameter_mm: float | None = None
    spect_fwhm_mm: float | None = None
    row: int = 0


@dataclass
class Manifest:
    path: Path
    patients: list[Patient] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self):
        return iter(self.patients)

    def ids(self) -> list[str]:
        return [p.patient_id for p in self.patients]

    def cohort(self, name: str) -> list[Patient]:
        return [p for p in self.patients if p.cohort == name]

    def by_id(self) -> dict[str, Patient]:
        return {p.patient_id: p for p in self.patients}


def load_manifest(path: str | Path, *, require_spect: bool = True, cohort: str | None = None) -> Manifest:
    """Read and validate a manifest. Every problem is reported with its row and patient id.

    require_spect: False for prediction, where only the CT is needed.
    cohort: keep only this cohort's rows (after validating the whole file).
    """
    path = Path(path)
    if not path.is_file():
        raise CtpmError("manifest does not exist", path=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CtpmError(f"cannot read the manifest ({exc})", path=path) from None
    if not text.strip():
        raise CtpmError("manifest is empty", path=path)
    reader = csv.DictReader(text.splitlines(), delimiter=_delimiter(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CtpmError(
            f"manifest lacks the column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}", path=path
        )
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise CtpmError(f"manifest repeats the column(s) {', '.join(dupes)}", path=path)
    root = path.parent
    patients: list[Patient] = []
    seen: dict[str, int] = {}
    for raw in reader:
        n = reader.line_num  # the row's line in the file (row 1 is the header; blank lines count)
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # a blank line
        pid = row.get("patient_id", "")

        def fail(msg: str, _n=n, _pid=pid) -> CtpmError:
            who = f"row {_n}" + (f" (patient {_pid})" if _pid else "")
            return CtpmError(f"{who}: {msg}", path=path)

        if None in raw:  # more fields than the header has
            raise fail("has more fields than the header")
        if not pid:
            raise fail("patient_id is empty")
        if not safe_id(pid):
            raise fail(f"patient_id {pid!r} may only hold {ID_RULE} (it names output files)")
        if pid in seen:
            raise fail(f"duplicate patient_id {pid!r} (also in row {seen[pid]})")
        seen[pid] = n
        cohort_value = row.get("cohort", "")
        if cohort_value not in COHORTS:
            raise fail(f"unknown cohort {cohort_value!r}; expected one of {', '.join(COHORTS)}")
        institution = row.get("institution", "")
        if not institution:
            raise fail("institution is empty")

        def resolve(column: str, required: bool, row: dict = row) -> Path | None:
            value = row.get(column, "")
            if not value:
                if required:
                    raise fail(f"column {column!r} is empty")
                return None
            p = Path(value)
            p = p if p.is_absolute() else (root / p)
            if not p.exists():
                raise fail(f"column {column!r}: file does not exist: {p}")
            return p

        diameter = row.get("tumor_diameter_mm", "")
        try:
            diameter_mm = float(diameter) if diameter else None
        except ValueError:
            raise fail(f"tumor_diameter_mm {diameter!r} is not a number") from None
        if diameter_mm is not None and (not math.isfinite(diameter_mm) or diameter_mm < 0):
            raise fail(f"tumor_diameter_mm {diameter!r} must be a non-negative number")
        fwhm = row.get("spect_fwhm_mm", "")
        try:
            fwhm_mm = float(fwhm) if fwhm else None
        except ValueError:
            raise fail(f"spect_fwhm_mm {fwhm!r} is not a number") from None
        if fwhm_mm is not None and not (math.isfinite(fwhm_mm) and fwhm_mm > 0):
            raise fail(f"spect_fwhm_mm {fwhm!r} must be a positive number (mm)")
        patients.append(
            Patient(
                patient_id=pid,
                cohort=cohort_value,
                institution=institution,
                ct=resolve("ct", True),  # type: ignore[arg-type]
                spect=resolve("spect", require_spect),
                lung_mask=resolve("lung_mask", False),
                lobes=resolve("lobes", False),
                perfusion=resolve("perfusion", False),
                oracle=resolve("oracle", False),
                dose=resolve("dose", False),
                tumor_diameter_mm=diameter_mm,
                spect_fwhm_mm=fwhm_mm,
                row=n,
            )
        )
    if not patients:
        raise CtpmError("manifest has a header but no patients", path=path)
    manifest = Manifest(path=path, patients=patients)
    if cohort is not None:
        if cohort not in COHORTS:
            raise CtpmError(f"unknown cohort {cohort!r}; expected one of {', '.join(COHORTS)}")
        manifest.patients = manifest.cohort(cohort)
        if not manifest.patients:
            raise CtpmError(f"manifest has no patients of cohort {cohort!r}", path=path)
    return manifest


def _delimiter(text: str) -> str:
    """',' unless the header holds the required columns only when split by ';' or a tab (a CSV
    saved by a spreadsheet in a locale with decimal commas, or a TSV)."""
    header = next((ln for ln in text.splitlines() if ln.strip()), "")
    for d in (",", ";", "\t"):
        if set(REQUIRED) <= {h.strip().strip('"') for h in header.split(d)}:
            return d
    return ","


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write a manifest CSV (paths as given: relative to the manifest's folder). Columns the rows
    carry beyond the known ones (e.g. ``spect_fwhm_mm`` of synthetic cohorts) follow them."""
    path = Path(path)
    columns = list(REQUIRED) + [c for c in OPTIONAL if any(c in r for r in rows)]
    columns += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in columns]
    fh = io.StringIO(newline="")
    writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in columns})
    return atomic_write(path, fh.getvalue())
