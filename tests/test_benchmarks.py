"""Smoke tests of ``make bench``: every benchmark's quick run gives well-formed rows, and the README
section is replaced between its markers only. No assertion on any figure: these machines are shared,
and ``--quick`` sizes say nothing about the targets."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from benchmarks import run as bench_run


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.parametrize("name", list(bench_run.BENCHES))
def test_quick_run_gives_well_formed_rows(name):
    rows = importlib.import_module(bench_run.BENCHES[name]).run(quick=True)
    assert rows
    for r in rows:
        assert set(r) == set(bench_run.ROW_KEYS), r
        assert r["benchmark"] and isinstance(r["benchmark"], str)
        assert r["measure"] and isinstance(r["measure"], str)
        assert _finite_number(r["value"]), r
        assert isinstance(r["unit"], str) and isinstance(r["reference"], str) and isinstance(r["target"], str)
        assert r["reference_value"] is None or _finite_number(r["reference_value"]), r
        assert r["ratio"] is None or (_finite_number(r["ratio"]) and r["reference_value"] is not None), r
        # a row with a target says whether it is met; a row without one does not
        assert (r["ok"] is None) == (r["target"] == "none"), r
        assert r["ok"] in (True, False, None)
    table = bench_run.markdown_table(rows).splitlines()
    assert len(table) == len(rows) + 2
    assert all(line.count(" | ") == len(bench_run.TABLE_COLUMNS) - 1 for line in table[2:])


README = "# ctpm\n\nintro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## After\nkept | as is\n"


def test_update_readme_replaces_only_between_the_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README)
    bench_run.update_readme(path, "new section\n| a | b |")
    text = path.read_text()
    assert text == README.replace("\nold table\n", "\nnew section\n| a | b |\n")
    bench_run.update_readme(path, "newer")  # a second run replaces the first one's section
    assert path.read_text() == README.replace("\nold table\n", "\nnewer\n")


@pytest.mark.parametrize("text", [
    "# ctpm\nno markers\n",
    "# ctpm\n<!-- bench:start -->\nno end\n",
    "# ctpm\n<!-- bench:end -->\nswapped\n<!-- bench:start -->\n",
])
def test_run_refuses_a_readme_without_markers(tmp_path, monkeypatch, capsys, text):
    path = tmp_path / "README.md"
    path.write_text(text)

    def must_not_run(*args, **kwargs):
        raise AssertionError("benchmarks ran although the README cannot take their table")

    monkeypatch.setattr(bench_run, "run_benches", must_not_run)
    assert bench_run.main(["--only", "synth", "--readme", str(path)]) == 1
    assert path.read_text() == text
    assert "<!-- bench:start -->" in capsys.readouterr().err


def test_run_writes_its_section_into_the_readme(tmp_path, capsys):
    path, json_path = tmp_path / "README.md", tmp_path / "bench.json"
    path.write_text(README)
    assert bench_run.main(["--quick", "--only", "synth", "--readme", str(path), "--json", str(json_path)]) == 0
    text = path.read_text()
    before, rest = text.split("<!-- bench:start -->")
    section, after = rest.split("<!-- bench:end -->")
    assert before == README.split("<!-- bench:start -->")[0]
    assert after == README.split("<!-- bench:end -->")[1]
    assert "python -m benchmarks.run --quick --only synth" in section
    for expected in ("CPU:", "OS:", "torch", "numpy", "GPU:", "| benchmark | measure | value |", "| synth |"):
        assert expected in section
    assert "| benchmark | measure | value |" in capsys.readouterr().out  # the table is printed too
    saved = json.loads(json_path.read_text())
    assert saved["rows"] and all(r["benchmark"] == "synth" for r in saved["rows"])


def test_gpu_rows_are_well_formed():
    """The GPU rows are only measured on a GPU machine; their assembly is checked on made-up results."""
    from benchmarks import bench_train

    steps = {name: {"step_seconds": [[0.2, 0.1, 0.3]], "peak_gpu_bytes": [2e9], "gpu": "Made-up GPU"}
             for name in bench_train.GPU_VARIANTS}
    rows = bench_train._gpu_rows(steps, bench_train.FULL, "train step", loader_rate=100.0)
    assert len(rows) == 2 * len(bench_train.GPU_VARIANTS) + 1
    assert all(set(r) == set(bench_run.ROW_KEYS) and _finite_number(r["value"]) for r in rows)
    assert all("Made-up GPU" in r["measure"] for r in rows[::2][:len(bench_train.GPU_VARIANTS)])
    assert rows[0]["value"] == pytest.approx(bench_train.BATCH / 0.2)
