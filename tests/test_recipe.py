"""YAML recipes: the schema's checks (all problems at once, with lines), path resolution, and runs that equal
the Python API's merge. Every shipped recipe is validated and dry-run through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import rel

import lora_merge as lm
from lora_merge.errors import BaseModelMismatchError, OutputExistsError, RecipeError
from lora_merge.recipe import load_recipe, parse_recipe
from lora_merge.runner import plan, run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adapters"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# ---- the shipped recipes ------------------------------------------------------------------------------------
def test_at_least_five_recipes_ship_and_each_starts_with_its_command():
    assert len(RECIPES) >= 5
    for path in RECIPES:
        head = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any(f"lora-merge merge recipes/{path.name}" in line for line in head[:12]), path.name
    methods = {load_recipe(p).method for p in RECIPES}
    assert {"sum", "ties_svd", "svd", "lorahub"} <= methods
    assert any(load_recipe(p).expression and "-" in load_recipe(p).expression for p in RECIPES)   # a negation


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_dry_runs_through_the_entry_point(path, tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "lora_merge.cli", "merge", str(path), "--dry-run", "--json",
                        "-o", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    recipe = load_recipe(path)
    assert p["method"] == recipe.method and p["modules"] == 60
    assert [i["name"] for i in p["inputs"]] == [i.name for i in recipe.inputs]
    assert p["output"] == {**p["output"], "path": str(out), "exists": False}
    assert not out.exists()                      # a dry run writes nothing


def test_the_task_arithmetic_recipe_equals_the_api(tmp_path):
    adapter, out = run(load_recipe(ROOT / "recipes" / "task_arithmetic.yaml"), tmp_path / "ta")
    a, b = lm.load(EXAMPLES / "addition"), lm.load(EXAMPLES / "subtraction")
    got = lm.load(out)
    for m in list(got.modules)[:8]:
        assert rel(got.delta(m), 0.7 * a.delta(m) + 0.7 * b.delta(m)) < 2e-3     # stored in float16
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "task-arithmetic" in card
    assert (ROOT / "recipes" / "task_arithmetic.yaml").read_text().strip() in card   # the recipe itself
    assert adapter.name == "addition-and-subtraction"


def test_the_ties_recipe_equals_the_api(tmp_path):
    _, out = run(load_recipe(ROOT / "recipes" / "ties.yaml"), tmp_path / "ties")
    inputs = [lm.load(EXAMPLES / n) for n in ("addition", "subtraction", "intent")]
    want = lm.merge(inputs, [1.0, 1.0, 1.0], "ties_svd", density=0.5, rank=16)
    got = lm.load(out)
    assert got.dtype == torch.float16
    for m in list(got.modules)[:6]:
        assert rel(got.delta(m), want.delta(m)) < 2e-3


def test_the_lorahub_recipe_holds_the_original_defaults():
    recipe = load_recipe(ROOT / "recipes" / "lorahub.yaml")
    assert recipe.parameters["budget"] == 40 and recipe.parameters["bounds"] == [-1.5, 1.5]
    assert recipe.parameters["penalty"] == 0.05 and recipe.parameters["compose"] == "factor"
    assert Path(recipe.parameters["examples"]).is_file()


# ---- validation ---------------------------------------------------------------------------------------------
def test_every_problem_is_reported_at_once_with_its_line(tmp_path):
    path = write(tmp_path, f"""
        methd: ties
        method: tie
        rank: eight
        dtype: float8
        parameters:
          density: 2
        inputs:
          - adapter: {EXAMPLES / 'addition'}
            wieght: 0.5
          - adapter: {tmp_path / 'nowhere'}
          - {{adapter: {EXAMPLES / 'intent'}, weight: high}}
        output:
          metadata:
            tags: 3
    """)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    got = {(line, key) for line, key, _ in e.value.problems}
    assert got == {(1, "methd"), (2, "method"), (3, "rank"), (4, "dtype"), (9, "inputs[0].wieght"),
                   (10, "inputs[1].adapter"), (11, "inputs[2].weight"), (14, "output.metadata.tags")}
    text = str(e.value)
    assert text.startswith(f"{path}: 8 problems in the recipe")
    assert "did you mean 'method'?" in text and "did you mean 'ties'?" in text and "did you mean 'weight'?" in text
    assert "line 3, rank: expected int, got the text 'eight'" in text
    assert f"{tmp_path / 'nowhere'}: no such adapter folder" in text


def test_method_parameters_are_checked_against_the_registry(tmp_path):
    path = write(tmp_path, f"""
        method: ties_svd
        parameters:
          densty: 0.5
          majority_sign_method: most
          rank: 4
        inputs: ["{EXAMPLES / 'addition'}"]
    """)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msgs = {key: msg for _, key, msg in e.value.problems}
    assert "did you mean 'density'?" in msgs["parameters.densty"]
    assert "must be one of ['total', 'frequency']" in msgs["parameters.majority_sign_method"]
    assert "top-level key" in msgs["parameters.rank"]
    assert "needs the parameter 'density'" in msgs["method"]


def test_duplicate_keys_names_and_conflicting_weights_are_problems(tmp_path):
    path = write(tmp_path, f"""
        method: sum
        method: svd
        inputs:
          - {{adapter: {EXAMPLES / 'addition'}, name: a, weight: 1}}
          - {{adapter: {EXAMPLES / 'intent'}, name: a}}
        expression: a - b
    """)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = str(e.value)
    assert "line 2, method: given twice" in text
    assert "two inputs are named 'a'" in text
    assert "either by expression or per input" in text
    assert "unknown adapter 'b'" in text


def test_an_expression_must_use_every_input(tmp_path):
    path = write(tmp_path, f"""
        method: sum
        inputs: ["{EXAMPLES / 'addition'}", "{EXAMPLES / 'intent'}"]
        expression: 2*addition
    """)
    with pytest.raises(RecipeError, match="does not use the input"):
        load_recipe(path)


def test_yaml_syntax_errors_and_empty_recipes_are_one_clear_error(tmp_path):
    with pytest.raises(RecipeError, match=r"line 3: not valid YAML"):
        load_recipe(write(tmp_path, "method: sum\ninputs: [a, b\n"))
    with pytest.raises(RecipeError, match="the recipe is empty"):
        load_recipe(write(tmp_path, "# nothing\n", "empty.yaml"))
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n", "list.yaml"))
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_cannot_construct_python_objects(tmp_path):
    path = write(tmp_path, "method: !!python/object/apply:os.system ['echo pwned']\ninputs: [x]\n")
    with pytest.raises(RecipeError):
        load_recipe(path)
    path = write(tmp_path, "method: sum\ninputs: [x]\nname: !!python/name:os.system\n", "scalar.yaml")
    with pytest.raises(RecipeError, match="line 3: could not determine a constructor"):
        load_recipe(path)


# ---- paths, globs, Hub ids ----------------------------------------------------------------------------------
def test_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    (tmp_path / "project" / "adapters").symlink_to(EXAMPLES)
    path = write(folder, """
        method: svd
        inputs: [../adapters/*]
        rank: 4
        output: {path: ../out/merged}
    """)
    monkeypatch.chdir(tmp_path)                      # somewhere else entirely
    recipe = load_recipe(path)
    assert [i.name for i in recipe.inputs] == ["addition", "intent", "subtraction"]       # sorted glob
    assert recipe.output == tmp_path / "project" / "out" / "merged"
    _, out = run(recipe)
    assert out == recipe.output and lm.load(out).modules["model.layers.0.self_attn.q_proj"].rank == 4


def test_hub_ids_and_revisions(tmp_path):
    recipe = parse_recipe(textwrap.dedent("""
        method: sum
        inputs:
          - org/math-lora@v2
          - {adapter: org/code-lora, revision: abc123, name: code}
    """))
    assert [(i.name, i.source, i.revision) for i in recipe.inputs] == [
        ("math_lora", "org/math-lora", "v2"), ("code", "org/code-lora", "abc123")]
    with pytest.raises(RecipeError, match="revision given twice"):
        parse_recipe("method: sum\ninputs: [{adapter: org/x@v1, revision: v2}]\n")
    with pytest.raises(RecipeError, match="applies to Hub ids only"):
        parse_recipe(f"method: sum\ninputs: [{{adapter: {EXAMPLES / 'intent'}, revision: v2}}]\n")


# ---- runs ---------------------------------------------------------------------------------------------------
def test_output_rules_existing_folders_and_force(tmp_path):
    path = write(tmp_path, f"""
        method: sum
        inputs: ["{EXAMPLES / 'addition'}"]
    """)
    recipe = load_recipe(path)
    with pytest.raises(lm.LoraMergeError, match="no output folder"):
        run(recipe)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        run(recipe, tmp_path / "taken")
    with pytest.raises(OutputExistsError, match="not an adapter folder"):
        run(recipe, tmp_path / "taken", force=True)          # --force replaces adapter folders only
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    run(recipe, tmp_path / "merged")
    (tmp_path / "merged" / "stale.txt").write_text("old")
    run(recipe, tmp_path / "merged", force=True)
    assert not (tmp_path / "merged" / "stale.txt").exists()


def test_the_recipes_base_model_is_checked(tmp_path):
    path = write(tmp_path, f"""
        method: sum
        base_model: meta-llama/Llama-3-8B
        inputs: ["{EXAMPLES / 'addition'}"]
    """)
    with pytest.raises(BaseModelMismatchError, match=r"recipe.yaml, line 3: input 'addition'.*SmolLM2"):
        run(load_recipe(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_seed_dtype_and_rank_reach_the_merge(tmp_path):
    def recipe(seed):
        return parse_recipe(textwrap.dedent(f"""
            method: dare_linear_svd
            parameters: {{density: 0.5}}
            inputs: ["{EXAMPLES / 'addition'}", "{EXAMPLES / 'intent'}"]
            rank: 4
            seed: {seed}
            dtype: float32
        """), tmp_path / "r.yaml")
    a, _ = run(recipe(1), tmp_path / "s1")
    b, _ = run(recipe(1), tmp_path / "s1b")
    c, _ = run(recipe(2), tmp_path / "s2")
    m = "model.layers.3.self_attn.q_proj"
    assert torch.equal(a.delta(m), b.delta(m)) and not torch.equal(a.delta(m), c.delta(m))
    saved = lm.load(tmp_path / "s1")
    assert saved.dtype == torch.float32 and saved.modules[m].rank == 4
    assert a.provenance["params"]["seed"] == 1


def test_plan_describes_without_computing(tmp_path, monkeypatch):
    import lora_merge.runner as runner
    monkeypatch.setattr(runner, "merge", lambda *a, **k: pytest.fail("a plan must not merge"))
    p = plan(load_recipe(ROOT / "recipes" / "svd_library.yaml"))
    assert p["output"]["rank"] == 8 and p["shapes"] == {"576x576": 30, "192x576": 30}
    assert [i["weight"] for i in p["inputs"]] == [0.5, 0.5, 0.5]


def test_a_cards_recipe_reproduces_the_merge(tmp_path):
    """The recipe written in every model card remakes the adapter exactly."""
    inputs = {n: lm.load(EXAMPLES / n) for n in ("addition", "intent")}
    first = lm.merge(inputs, [0.8, -0.4], "ties", density=0.6, rank=6, name="first")
    first.save(tmp_path / "first")
    card = (tmp_path / "first" / "README.md").read_text()
    text = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = parse_recipe(text, tmp_path / "from_card.yaml")
    again, _ = run(recipe, tmp_path / "again")
    for m in first.modules:
        assert torch.equal(lm.load(tmp_path / "again").modules[m].A, lm.load(tmp_path / "first").modules[m].A)
    assert again.provenance["params"] == first.provenance["params"]


def test_review_regressions_in_recipes(tmp_path):
    import shutil
    lib = tmp_path / "lib"
    for n in ("addition", "intent"):
        shutil.copytree(EXAMPLES / n, lib / n)
    path = write(tmp_path, "method: sum\ninputs: [lib/*]\noutput: {path: lib/merged}\n")
    run(load_recipe(path))
    adapter, _ = run(load_recipe(path), force=True)                  # the glob now also matches lib/merged
    assert [rec["name"] for rec in adapter.provenance["inputs"]] == ["addition", "intent"]
    with pytest.raises(RecipeError) as e:
        parse_recipe("name: x\n")
    assert {key for _, key, _ in e.value.problems} == {"method", "inputs"}   # missing keys named by their key
    with pytest.raises(RecipeError, match="method 'cat' takes no rank"):
        parse_recipe(f"method: cat\nrank: 4\ninputs: ['{EXAMPLES / 'intent'}']\n")
    with pytest.raises(RecipeError, match="expected a mapping of parameter names"):
        parse_recipe(f"method: sum\nparameters: []\ninputs: ['{EXAMPLES / 'intent'}']\n")
    with pytest.raises(RecipeError, match="a glob adds several inputs"):
        parse_recipe(f"method: sum\ninputs: [{{adapter: '{EXAMPLES}/*', name: lib}}]\n")


def test_dry_run_of_a_factor_method_knows_its_rank_and_its_equal_rank_rule(tmp_path):
    lm.load(EXAMPLES / "intent").compress(rank=4).save(tmp_path / "r4")
    ok = parse_recipe(f"method: ties\nparameters: {{density: 0.5}}\n"
                      f"inputs: ['{EXAMPLES / 'intent'}', '{EXAMPLES / 'addition'}']\n")
    assert plan(ok)["output"]["rank"] == 8
    bad = parse_recipe(f"method: linear\ninputs: ['{EXAMPLES / 'intent'}', '{tmp_path / 'r4'}']\n")
    with pytest.raises(lm.MethodError, match="needs equal ranks"):
        plan(bad)
