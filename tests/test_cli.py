"""The `lora-merge` entry point, run as a user runs it (subprocess) and through typer's runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


ROOT = Path(__file__).resolve().parents[1]


def test_merge_runs_a_recipe_and_prints_json(tmp_path):
    out = tmp_path / "ta"
    r = _run("merge", str(ROOT / "recipes" / "task_arithmetic.yaml"), "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["output"] == str(out) and summary["method"] == "sum" and summary["ranks"] == [16]
    assert [i["weight"] for i in summary["inputs"]] == [0.7, 0.7] and summary["pushed"] is None
    assert (out / "adapter_model.safetensors").is_file()
    r = _run("merge", str(ROOT / "recipes" / "task_arithmetic.yaml"), "-o", str(out))
    assert r.returncode == 2 and "already exists; pass --force" in r.stderr
    r = _run("merge", str(ROOT / "recipes" / "task_arithmetic.yaml"), "-o", str(out), "--force", "--quiet")
    assert r.returncode == 0 and r.stdout.startswith(f"saved {out} (sum, 60 modules, rank 16)") and not r.stderr


def test_a_bad_recipe_lists_every_problem_and_exits_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: tie\ninputs: [nowhere/folder/x]\nrnak: 3\n")
    r = _run("merge", str(recipe), "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"error: {recipe}: 3 problems in the recipe"
    assert lines[1].startswith("  line 1, method: unknown merge method 'tie' (did you mean 'ties'?)")
    assert lines[3].startswith("  line 3, rnak: unknown key (did you mean 'rank'?)")


def test_dry_run_prints_the_plan_as_a_table(tmp_path):
    r = _run("merge", str(ROOT / "recipes" / "ties.yaml"), "--dry-run", "-o", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing is computed or written" in r.stdout
    assert "method: ties_svd (density=0.5, majority_sign_method=total, rank=16, svd=auto)" in r.stdout
    assert "modules: 60 (30 x 576x576, 30 x 192x576)" in r.stdout
    assert "subtraction" in r.stdout and not (tmp_path / "x").exists()


def test_inspect_reports_norms_and_the_rank_really_used(tmp_path):
    a = lm.load(EXAMPLES / "addition")
    (a + lm.load(EXAMPLES / "addition")).save(tmp_path / "twice")   # stored at rank 16; its updates have rank 8
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "twice"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["ranks"] == [16] and info["n_modules"] == 60 and info["base_model"].endswith("SmolLM2-135M-Instruct")
    m = "model.layers.2.self_attn.v_proj"
    row = next(x for x in info["modules"] if x["module"] == m)
    s = torch.linalg.svdvals(2 * a.delta(m, torch.float64))
    assert abs(row["norm"] - float(s.norm())) < 1e-3 * float(s.norm())
    assert abs(row["top_singular_value"] - float(s[0])) < 1e-3 * float(s[0])
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    assert row["rank_90"] == int((share < 0.9).sum()) + 1 and row["rank_99"] <= 8
    assert len(info["energy_profile"]) == 16 and abs(info["energy_profile"][7] - 1.0) < 1e-6
    r = _run("inspect", str(EXAMPLES / "intent"))
    assert r.returncode == 0, r.stderr
    assert "r=8, lora_alpha=16" in r.stdout and "energy profile" in r.stdout and "rank@99%" in r.stdout


def test_other_failures_exit_1_with_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path):
    import lora_merge.summary

    def broken(adapter):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(lora_merge.summary, "describe", broken)
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(EXAMPLES / "intent")])
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: RuntimeError: something unexpected (run with --debug for the traceback)"
    r = runner.invoke(app, ["--debug", "inspect", str(EXAMPLES / "intent")])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
    from lora_merge.cli._common import state
    state.debug = False
    monkeypatch.setenv("LORA_MERGE_DEBUG", "1")
    r = runner.invoke(app, ["compose", "x", "-a", f"x={tmp_path / 'missing'}", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2                                    # bad input keeps its exit code under --debug
    assert "Traceback" in r.stderr and "AdapterLoadError" in r.stderr and "missing: no such adapter folder" in r.stderr


def test_usage_errors_exit_2_and_every_command_has_examples():
    runner = CliRunner()
    r = runner.invoke(app, ["compose", "a"])                  # missing -a / -o
    assert r.exit_code == 2
    for cmd in ("merge", "compose", "inspect", "push", "methods"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.stdout, cmd
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == lm.__version__


def test_compose_json_params_and_device(tmp_path):
    out = tmp_path / "t"
    r = _run("compose", "addition + 0.5*intent", "-a", f"addition={EXAMPLES / 'addition'}",
             "-a", f"intent={EXAMPLES / 'intent'}", "--method", "ties", "--density", "0.5",
             "-p", "majority_sign_method=frequency", "--dtype", "float32", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["method"] == "ties" and s["parameters"]["majority_sign_method"] == "frequency"
    assert lm.load(out).dtype == torch.float32
    r = _run("compose", "a", "-a", f"a={EXAMPLES / 'intent'}", "-p", "densty=0.5", "--method", "ties",
             "-o", str(tmp_path / "u"))
    assert r.returncode == 2 and "no parameter 'densty'" in r.stderr
    if not torch.cuda.is_available():
        r = _run("compose", "a", "-a", f"a={EXAMPLES / 'intent'}", "--device", "cuda", "--rank", "4",
                 "-o", str(tmp_path / "v"))
        assert r.returncode == 2 and "no CUDA device" in r.stderr and not (tmp_path / "v").exists()


def _copy_example(tmp_path: Path, name: str, edit_tensors=None, edit_config=None) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / "intent", folder)
    if edit_tensors is not None:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    if edit_config is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        edit_config(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _nan(t):
    t[Q0 + ".lora_A.weight"][0, 0] = float("nan")


def _wider(t):
    t[Q0 + ".lora_B.weight"] = torch.zeros(640, 8, dtype=torch.float16)


def _other_base(c):
    c["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"


def _pickled(folder: Path) -> None:
    from safetensors.torch import load_file
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


BAD_INPUTS = {
    # case: (compose arguments after the expression, what the one line must contain)
    "missing folder": (lambda d: ["x", "-a", f"x={d / 'nowhere'}"], "nowhere: no such adapter folder"),
    "NaN weights": (lambda d: ["x", "-a", f"x={_copy_example(d, 'nan', _nan)}"],
                    "module model.layers.0.self_attn.q_proj holds NaN or Inf"),
    "shape mismatch": (lambda d: ["x + y", "-a", f"x={EXAMPLES / 'intent'}",
                                  "-a", f"y={_copy_example(d, 'wide', _wider)}"], "model.layers.0.self_attn.q_proj"),
    "base model mismatch": (lambda d: ["x + y", "-a", f"x={EXAMPLES / 'intent'}",
                                       "-a", f"y={_copy_example(d, 'other', edit_config=_other_base)}"],
                            "different base models"),
    "pickle": (lambda d: ["x", "-a", f"x={_pickle_copy(d)}"], "adapter_model.bin: this adapter is stored as a pickle"),
    "unknown method": (lambda d: ["x", "-a", f"x={EXAMPLES / 'intent'}", "--method", "tiez"],
                       "unknown merge method 'tiez' (did you mean 'ties'?)"),
    "wrong key": (lambda d: ["x", "-a", f"x={EXAMPLES / 'intent'}", "--method", "ties", "-p", "dencity=0.5"],
                  "has no parameter 'dencity'"),
    "bad expression": (lambda d: ["x +* 2", "-a", f"x={EXAMPLES / 'intent'}"], "column"),
    "bad -a": (lambda d: ["x", "-a", "x"], "--adapter expects NAME=PATH_OR_REPO"),
}


def _pickle_copy(d: Path) -> Path:
    folder = _copy_example(d, "pickled")
    _pickled(folder)
    return folder


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    make_args, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    args = make_args(tmp_path)
    r = CliRunner().invoke(app, ["compose", *args, "-o", str(out)])
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and expected in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_allow_base_mismatch_lets_the_merge_through(tmp_path):
    other = _copy_example(tmp_path, "other", edit_config=_other_base)
    r = CliRunner().invoke(app, ["compose", "x + y", "-a", f"x={EXAMPLES / 'intent'}", "-a", f"y={other}",
                                 "--allow-base-mismatch", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    m = "model.layers.4.self_attn.q_proj"
    assert rel(lm.load(tmp_path / "out").delta(m), 2 * lm.load(EXAMPLES / "intent").delta(m)) < 1e-3


def test_review_regressions(tmp_path):
    runner = CliRunner()
    a = f"a={EXAMPLES / 'intent'}"
    r = runner.invoke(app, ["compose", "a", "-a", a, "-p", "name=x", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and "no parameter 'name'" in r.stderr          # not a TypeError, exit 1
    r = runner.invoke(app, ["compose", "a", "-a", a, "--rank", "4", "--push-to-hub", "bad id!", "-o",
                            str(tmp_path / "q")])
    assert r.exit_code == 2 and "not a valid Hub repo id" in r.stderr and not (tmp_path / "q").exists()
    r = runner.invoke(app, ["compose", "a", "-a", a, "--dtype", "float8", "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--dtype must be" in r.stderr and not (tmp_path / "d").exists()
    r = runner.invoke(app, ["compose", "a", "-a", a, "-o", str(tmp_path / "one"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["inputs"][0]["source"] == str(EXAMPLES / "intent")
    assert "| a | 1 |" in (tmp_path / "one" / "README.md").read_text()     # a lone input keeps its provenance
