"""The `lora-merge` entry point, run as a user runs it (subprocess) and through typer's runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import rel
from typer.testing import CliRunner

import lora_merge as lm
from lora_merge.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adapters"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_merge.cli", *args], capture_output=True, text=True)


def test_compose_writes_the_exact_expression(tmp_path):
    out = tmp_path / "combo"
    r = _run("compose", "addition - 0.5*intent", "-a", f"addition={EXAMPLES / 'addition'}",
             "-a", f"intent={EXAMPLES / 'intent'}", "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = lm.load(out)
    add, intent = lm.load(EXAMPLES / "addition"), lm.load(EXAMPLES / "intent")
    m = "model.layers.5.self_attn.v_proj"
    assert rel(got.delta(m), add.delta(m) - 0.5 * intent.delta(m)) < 1e-3      # stored in float16, as the inputs
    assert got.modules[m].rank == 16


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    out = tmp_path / "never"
    r = _run("compose", "addition - 0.5*intnt", "-a", f"addition={EXAMPLES / 'addition'}",
             "-a", f"intent={EXAMPLES / 'intent'}", "-o", str(out))
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown adapter 'intnt'") and "Traceback" not in r.stderr
    assert not out.exists()
    r = _run("compose", "a", "-a", f"a={tmp_path / 'missing'}", "-o", str(out))
    assert r.returncode == 2 and "missing: no such adapter folder" in r.stderr


def test_methods_lists_the_registry():
    r = CliRunner().invoke(app, ["methods", "--json"])
    assert r.exit_code == 0
    listed = json.loads(r.stdout)
    assert set(listed) == set(lm.METHODS)
    assert listed["ties"]["params"]["density"]["required"] is True
