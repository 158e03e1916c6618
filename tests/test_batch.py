"""The batch helper: structured failures, the one summary message, a process pool, bugs raised."""

from __future__ import annotations

import pytest

from ctpm.batch import BatchResult, Failure, run_batch
from ctpm.errors import CtpmError


def _work(pid: str) -> int:
    if pid.startswith("bad"):
        raise CtpmError("no lung found", path=f"/data/{pid}/ct.nii.gz")
    return len(pid)


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_are_structured_and_the_others_go_on(workers):
    result = run_batch(_work, ["a", "bad1", "ccc", "bad2"], workers=workers, progress=False)
    assert result.ok == {"a": 1, "ccc": 3} and list(result.ok) == ["a", "ccc"]
    assert result.failed == [Failure("bad1", "no lung found", "/data/bad1/ct.nii.gz"),
                             Failure("bad2", "no lung found", "/data/bad2/ct.nii.gz")]
    assert result.total == 4
    assert result.message("preprocessed") == (
        "2 of 4 patients could not be preprocessed:\n"
        "  patient bad1, file /data/bad1/ct.nii.gz: no lung found\n"
        "  patient bad2, file /data/bad2/ct.nii.gz: no lung found")
    with pytest.raises(CtpmError, match="2 of 4 patients could not be preprocessed"):
        result.raise_if_failed("preprocessed")


def test_a_single_failure_is_its_own_line():
    result = run_batch(_work, ["a", "bad1"], progress=False)
    assert result.message("predicted", note="the other 1 is done") == \
        "patient bad1, file /data/bad1/ct.nii.gz: no lung found (the other 1 is done)"
    with pytest.raises(CtpmError) as err:
        result.raise_if_failed("predicted")
    assert err.value.patient == "bad1" and err.value.path == "/data/bad1/ct.nii.gz"
    assert BatchResult(ok={"a": 1}).message("predicted") is None
    BatchResult(ok={"a": 1}).raise_if_failed("predicted")  # nothing to raise


def test_a_bug_is_not_a_failure():
    def broken(pid):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_batch(broken, ["a"], progress=False)


def test_patients_by_id_of_dicts_and_objects():
    from types import SimpleNamespace

    assert list(run_batch(lambda p: 1, [{"patient_id": "x"}, SimpleNamespace(patient_id="y")], progress=False).ok) == ["x", "y"]
