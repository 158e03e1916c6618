"""Every tool's --help: what it does, its overrides with their defaults (as the config has them),
two worked examples, and only the config groups that the tool uses."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF
from tests.helpers import run_cli

# tool -> (config name, the groups it composes)
TOOLS = {
    "ctpm-synth": ("synth", set()),
    "ctpm-preprocess": ("preprocess", {"preprocessing"}),
    "ctpm-train": ("train", {"experiment", "scale", "trainer", "logger", "hparams_search"}),
    "ctpm-predict": ("predict", set()),
    "ctpm-evaluate": ("evaluate", {"preprocessing@evaluation"}),
    "ctpm-flart": ("flart", set()),
    "ctpm-manifest": ("manifest", set()),
    "python -m ctpm.cli.study": ("study", set()),
}
ALL_GROUPS = {p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"} | {"scale"}


def help_text(tool: str) -> str:
    if tool.startswith("python"):
        res = subprocess.run([sys.executable, "-m", "ctpm.cli.study", "--help"], capture_output=True, text=True,
                             timeout=120, check=False)
    else:
        res = run_cli(tool, "--help")
    assert res.returncode == 0, res.stderr
    return res.stdout


def section(text: str, title: str) -> list[str]:
    m = re.search(rf"^== {title}[^\n]*==\n(.*?)(?=^== |\Z)", text, re.DOTALL | re.MULTILINE)
    assert m, f"no section {title!r}"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and ln.startswith(" ")]  # the footer is not indented


@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_explains_the_tool(tool):
    text = help_text(tool)
    name, groups = TOOLS[tool]
    assert text.startswith(f"{tool}: ")  # the tool's name and what it does
    examples = section(text, "Examples")
    assert len(examples) >= 2 and all(ln.strip().startswith(tool) for ln in examples)
    listed = {m.group(1) for ln in section(text, "Config groups") if (m := re.match(r"\s+([\w@]+)\s*[:=]", ln))}
    assert listed == groups, f"{tool} lists the groups {listed}"
    assert not (listed - groups) & ALL_GROUPS
    # the defaults the help states are the config's
    if name == "train":
        return  # the training tree is composed from groups; its defaults are checked by its own tests
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(name), resolve=False)
    checked = 0
    for ln in section(text, "Overrides"):
        m = re.match(r"\s+([\w.]+)=\S*\s.*\[([^\]]*)\]\s*$", ln)
        if not m or m.group(1) not in cfg or isinstance(cfg[m.group(1)], (dict, list)):
            continue
        key, stated = m.groups()
        value = cfg[key]
        want = {"???": "required", None: "null"}.get(value, str(value).lower()) if not isinstance(value, bool) \
            else str(value).lower()
        if stated.startswith(("from ", "null: ", "skipped.csv")):
            continue
        assert stated.lower() == want, f"{tool}: {key} is {value!r} in the config, the help says [{stated}]"
        checked += 1
    assert checked >= 3
