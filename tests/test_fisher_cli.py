"""The data-weighted merges end to end, as a user runs them: `lora-merge fisher` writes the statistics beside an
adapter, `compose --method fisher / regmean` finds them there (or takes `--fisher` / `--gram`), recipes name
them (`fisher:`, `gram:`) or estimate them (`data:` with `base_model` and `estimate:`), and the model card says
where they came from. A tiny Llama saved as a folder (with a word-level tokenizer), adapters made with PEFT,
no network."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, rel, tiny_llama
from test_lorahub import WORDS, tokenizer
from typer.testing import CliRunner

import lora_merge as lm
from lora_merge.cli import app
from lora_merge.fisher import Fisher, load_gram

FISHER, GRAM = "fisher.safetensors", "fisher.gram.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(r, code: int = 2) -> str:
    """The command failed with `code` and one line on stderr, no traceback; returns that line."""
    assert r.exit_code == code, (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stamp(*paths: Path) -> list[tuple[str, int]]:
    """What must not change: each file's content and modification time."""
    return [(sha256(p), p.stat().st_mtime_ns) for p in paths]


def bare_copy(src: Path, dst: Path) -> Path:
    """The adapter's own files only: no statistics beside it."""
    dst.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(src / name, dst / name)
    return dst


def write_rows(path: Path, n: int, seed: int) -> Path:
    """JSONL of the adapter's 'task': multiple-choice and free-text rows, alternately."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))
    with path.open("w") as f:
        for i in range(n):
            if i % 2 == 0:
                options = [words(rng.randint(1, 2)) for _ in range(3)]
                row = {"input": words(rng.randint(1, 4)), "options": options, "answer": rng.randrange(3)}
            else:
                row = {"input": words(rng.randint(1, 4)), "output": words(rng.randint(1, 2))}
            f.write(json.dumps(row) + "\n")
    return path


# ---- fixtures: a base model folder, two adapters with their data, and their statistics made by the CLI ----------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fisher-cli")


@pytest.fixture(scope="module")
def base_folder(root):
    """The tiny Llama (larger output layer: distributions far from uniform) and its tokenizer, as a folder named
    like the adapters' recorded base model ("tiny-llama")."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    folder = root / "tiny-llama"
    model.save_pretrained(str(folder))
    tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def originals(root):
    """Two adapters, without statistics: `a` (q, v) and `b` (q, v, o: a module `a` lacks), and their data."""
    made = root / "originals"
    return {"a": (make_adapter(made / "a", r=4, alpha=8, targets=("q_proj", "v_proj"), seed=21),
                  write_rows(root / "a.jsonl", 8, seed=1)),
            "b": (make_adapter(made / "b", r=4, alpha=4, targets=("q_proj", "v_proj", "o_proj"), seed=22),
                  write_rows(root / "b.jsonl", 8, seed=2))}


@pytest.fixture(scope="module")
def pair(root, originals, base_folder):
    """Copies of a and b, each with fisher.safetensors and fisher.gram.safetensors (delta space, expected
    Fisher) written beside it by `lora-merge fisher`."""
    out = {}
    for name, (src, data) in originals.items():
        folder = bare_copy(src, root / "with-stats" / name)
        r = cli("fisher", folder, "--base-model", base_folder, "--data", data, "-n", 6, "--kind", "expected",
                "--space", "delta", "--gram", "--device", "cpu", "--quiet")
        assert r.exit_code == 0, r.output
        out[name] = folder
    return out


def peft_deltas(base_folder: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Module path -> the update PEFT applies (scaling * B A), with the adapter loaded by PEFT itself."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_folder)), str(adapter))
    return {name: layer.scaling["default"] * layer.lora_B["default"].weight.double()
            @ layer.lora_A["default"].weight.double()
            for name, layer in model.base_model.model.named_modules() if isinstance(layer, LoraLayer)}


def stat_row(folder: Path, name: str) -> str:
    """Input `name`'s row of the model card's `## Statistics` table."""
    card = (folder / "README.md").read_text()
    assert "## Statistics" in card
    section = card.split("## Statistics", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {name} |"))


def assert_same_deltas(got: lm.Adapter, want: lm.Adapter, tol: float = 1e-5) -> None:
    assert set(got.metas) == set(want.metas)
    for path in want.metas:
        assert rel(got.delta(path), want.delta(path)) < tol, path


# ---- 1. lora-merge fisher -----------------------------------------------------------------------------------
def test_the_fisher_command_writes_both_files_beside_the_adapter_and_refuses_to_overwrite(
        tmp_path, originals, base_folder):
    src, data = originals["a"]
    folder = bare_copy(src, tmp_path / "a")
    common = ("fisher", folder, "--base-model", base_folder, "--data", data, "-n", 6, "--device", "cpu")
    args = (*common, "--kind", "expected", "--space", "delta", "--gram")
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    fisher_file, gram_file = folder / FISHER, folder / GRAM
    assert summary["output"] == str(fisher_file) and summary["gram"] == str(gram_file)
    assert (summary["space"], summary["kind"], summary["examples"], summary["modules"]) == ("delta", "expected", 6, 4)
    assert summary["seconds"] >= 0

    # the files hold what the library estimates with the same settings (not, e.g., the default kind or n)
    F = Fisher.load(fisher_file, gram_path=gram_file)
    assert F.space == "delta" and F.meta["kind"] == "expected" and F.meta["n_examples"] == "6"
    assert F.meta["data_sha256"] == sha256(data)
    ref = lm.fisher.estimate(str(base_folder), lm.load(folder), data, n_examples=6, kind="expected",
                             space="delta", gram=True, device="cpu")
    adapter = lm.load(folder)
    assert F.tensors.keys() == ref.tensors.keys() == adapter.metas.keys() == F.gram.keys()
    for m, t in ref.tensors.items():
        assert F.tensors[m]["delta"].shape == adapter.metas[m].shape
        assert torch.allclose(F.tensors[m]["delta"], t["delta"], rtol=1e-5, atol=0)
        assert torch.allclose(F.gram[m], ref.gram[m], rtol=1e-5, atol=0)

    # again without --force: exit 2, one line naming the file, and neither file touched
    before = stamp(fisher_file, gram_file)
    line = one_line_error(cli(*args))
    assert f"{fisher_file}: already exists" in line and "--force" in line
    assert stamp(fisher_file, gram_file) == before
    # only the Gram file in the way: named too, and nothing written
    fisher_file.unlink()
    line = one_line_error(cli(*args))
    assert f"{gram_file}: already exists" in line and not fisher_file.exists()
    assert stamp(gram_file) == before[1:]

    # --force writes over the Gram file (here with another kind, so that the replacement shows)
    r = cli(*common, "--kind", "empirical", "--space", "delta", "--gram", "--force")
    assert r.exit_code == 0, r.output
    assert "saved" in r.stdout and str(fisher_file) in r.stdout
    assert Fisher.load(fisher_file).meta["kind"] == "empirical"
    assert stamp(gram_file) != before[1:]
    r = cli(*common, "--kind", "sampled", "--space", "delta", "--gram", "--force")     # both files there
    assert r.exit_code == 0, r.output
    assert Fisher.load(fisher_file, gram_path=gram_file).meta["kind"] == "sampled"

    # an unknown kind or space is one clear error, and writes nothing
    for option, value, allowed in (("--kind", "fishy", "expected"), ("--space", "dense", "factor")):
        out = tmp_path / f"bad{option}.safetensors"
        line = one_line_error(cli("fisher", folder, "--base-model", base_folder, "--data", data, option, value,
                                  "-o", out, "--device", "cpu"))
        assert f"unknown {option[2:]} '{value}'" in line and allowed in line
        assert not out.exists()


def test_the_fisher_command_with_o_and_the_factor_space(tmp_path, originals, base_folder):
    src, data = originals["b"]
    out = tmp_path / "stats" / "b.fisher.safetensors"
    r = cli("fisher", src, "--base-model", base_folder, "--data", data, "-n", 3, "--kind", "sampled", "-o", out,
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["output"] == str(out) and summary["gram"] is None and summary["space"] == "factor"
    assert not (src / FISHER).exists() and not (out.parent / "b.fisher.gram.safetensors").exists()
    F = Fisher.load(out)
    assert F.space == "factor" and F.meta["kind"] == "sampled" and F.meta["n_examples"] == "3"
    adapter = lm.load(src)
    for m, w in adapter.metas.items():
        assert F.tensors[m]["A"].shape == w.A.shape and F.tensors[m]["B"].shape == w.B.shape


# ---- 2. compose --method fisher -----------------------------------------------------------------------------
def test_compose_fisher_finds_the_files_beside_the_adapters(tmp_path, pair, base_folder, originals):
    out = tmp_path / "merged"
    r = cli("compose", "0.5*a + 0.5*b", "-a", f"a={pair['a']}", "-a", f"b={pair['b']}", "--method", "fisher",
            "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "fisher" and summary["parameters"]["normalize"] is True

    ads = [lm.load(pair["a"], name="a"), lm.load(pair["b"], name="b")]
    want = lm.merge(ads, [0.5, 0.5], method="fisher", fishers=[Fisher.load(p / FISHER) for p in pair.values()])
    got = lm.load(out)
    assert_same_deltas(got, want)
    # PEFT loads the folder and applies the same updates
    peft = peft_deltas(base_folder, out)
    assert set(peft) == set(want.metas)
    for path, d in peft.items():
        assert rel(d, want.delta(path)) < 1e-5, path
    # the Fishers weigh the average: not the plain mean of the two updates
    q = "model.layers.0.self_attn.q_proj"
    assert rel(got.delta(q), 0.5 * ads[0].delta(q) + 0.5 * ads[1].delta(q)) > 1e-2
    # a module only b has takes b's update alone (up to the SVD to rank 4 of a rank-4 update: exactly)
    o = "model.layers.1.self_attn.o_proj"
    assert rel(got.delta(o), ads[1].delta(o)) < 1e-5

    for name in ("a", "b"):
        row = stat_row(out, name)
        assert "`expected`" in row and "`delta`" in row and "`6`" in row
        assert f"`{sha256(originals[name][1])}`" in row


def test_compose_fisher_option_overrides_the_file_beside(tmp_path, pair, base_folder, originals):
    other = tmp_path / "a.empirical.safetensors"
    r = cli("fisher", pair["a"], "--base-model", base_folder, "--data", originals["b"][1], "-n", 4,
            "--kind", "empirical", "--space", "delta", "-o", other, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    expr = ("0.5*a + 0.5*b", "-a", f"a={pair['a']}", "-a", f"b={pair['b']}", "--method", "fisher")
    r = cli("compose", *expr, "--fisher", f"a={other}", "-o", tmp_path / "override")
    assert r.exit_code == 0, r.output
    ads = [lm.load(pair["a"], name="a"), lm.load(pair["b"], name="b")]
    want = lm.merge(ads, [0.5, 0.5], method="fisher", fishers={"a": other, "b": pair["b"] / FISHER})
    beside = lm.merge(ads, [0.5, 0.5], method="fisher", fishers=[p / FISHER for p in pair.values()])
    got = lm.load(tmp_path / "override")
    assert_same_deltas(got, want)
    q = "model.layers.0.self_attn.q_proj"
    assert rel(got.delta(q), beside.delta(q)) > 1e-3            # the override made a difference
    row = stat_row(tmp_path / "override", "a")
    assert "`empirical`" in row and f"`{sha256(originals['b'][1])}`" in row and "`4`" in row

    # --fisher belongs to --method fisher; --gram to regmean
    out = tmp_path / "ties"
    line = one_line_error(cli("compose", "0.5*a + 0.5*b", "-a", f"a={pair['a']}", "-a", f"b={pair['b']}",
                              "--method", "ties", "--density", 0.5, "--fisher", f"a={other}", "-o", out))
    assert "--fisher is for --method fisher" in line and not out.exists()
    line = one_line_error(cli("compose", *expr, "--gram", f"a={pair['a'] / GRAM}", "-o", out))
    assert "--gram is for --method regmean" in line and not out.exists()
    # a --fisher file that is not there, or for an adapter not in the expression
    line = one_line_error(cli("compose", *expr, "--fisher", f"a={tmp_path / 'nope.safetensors'}", "-o", out))
    assert "nope.safetensors: no such file" in line and not out.exists()
    line = one_line_error(cli("compose", *expr, "--fisher", f"c={other}", "-o", out))
    assert "'c'" in line and not out.exists()


def test_compose_fisher_without_a_fisher_is_one_clear_error(tmp_path, pair, originals):
    c = bare_copy(originals["a"][0], tmp_path / "c")
    out = tmp_path / "out"
    line = one_line_error(cli("compose", "a + c", "-a", f"a={pair['a']}", "-a", f"c={c}", "--method", "fisher",
                              "-o", out))
    assert "no Fisher for adapter 'c'" in line and FISHER in line and "lora-merge fisher" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # regmean: no Gram file beside it
    line = one_line_error(cli("compose", "a + c", "-a", f"a={pair['a']}", "-a", f"c={c}", "--method", "regmean",
                              "-o", out))
    assert "no Gram matrices for adapter 'c'" in line and GRAM in line and "--gram" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_fishers_of_different_spaces_do_not_merge(tmp_path, pair, base_folder, originals):
    factor = tmp_path / "a.factor.safetensors"
    r = cli("fisher", pair["a"], "--base-model", base_folder, "--data", originals["a"][1], "-n", 2,
            "--kind", "empirical", "-o", factor, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    line = one_line_error(cli("compose", "a + b", "-a", f"a={pair['a']}", "-a", f"b={pair['b']}", "--method",
                              "fisher", "--fisher", f"a={factor}", "-o", out))
    assert "different spaces" in line and "a: factor" in line and "b: delta" in line and not out.exists()


# ---- 3. compose --method regmean ----------------------------------------------------------------------------
def test_compose_regmean_with_the_grams_beside_and_given(tmp_path, pair, base_folder):
    ads = [lm.load(pair["a"], name="a"), lm.load(pair["b"], name="b")]
    want = lm.merge(ads, [1.0, 2.0], method="regmean", grams=[load_gram(p / GRAM) for p in pair.values()])
    r = cli("compose", "a + 2*b", "-a", f"a={pair['a']}", "-a", f"b={pair['b']}", "--method", "regmean",
            "-p", "alpha=0.9", "-o", tmp_path / "beside", "--json")
    assert r.exit_code == 0, r.output
    got = lm.load(tmp_path / "beside")
    assert_same_deltas(got, want)
    assert json.loads(r.stdout)["ranks"] == [4, 8]      # exact: the sum of the ranks of the inputs that have it
    peft = peft_deltas(base_folder, tmp_path / "beside")
    for path, d in peft.items():
        assert rel(d, want.delta(path)) < 1e-5, path
    q = "model.layers.1.self_attn.v_proj"
    assert rel(got.delta(q), (ads[0].delta(q) + 2 * ads[1].delta(q)) / 3) > 1e-2   # not the plain average
    assert "## Statistics" in (tmp_path / "beside" / "README.md").read_text()

    # the same Grams from elsewhere, for adapters with nothing beside them
    bare = {n: bare_copy(p, tmp_path / "bare" / n) for n, p in pair.items()}
    grams = {}
    for n, p in pair.items():
        grams[n] = shutil.copy2(p / GRAM, tmp_path / f"{n}.gram.safetensors")
    r = cli("compose", "a + 2*b", "-a", f"a={bare['a']}", "-a", f"b={bare['b']}", "--method", "regmean",
            "--gram", f"a={grams['a']}", "--gram", f"b={grams['b']}", "-o", tmp_path / "given")
    assert r.exit_code == 0, r.output
    assert_same_deltas(lm.load(tmp_path / "given"), want)
    # other weights give another regression (the weights scale the Grams)
    other = lm.merge(ads, [1.0, 1.0], method="regmean", grams=[load_gram(p / GRAM) for p in pair.values()])
    assert rel(other.delta(q), want.delta(q)) > 1e-3


# ---- 4. recipes ---------------------------------------------------------------------------------------------
def test_a_recipe_with_fisher_files(tmp_path, pair, base_folder, originals):
    stats = tmp_path / "stats"
    stats.mkdir()
    for n, p in pair.items():
        shutil.copy2(p / FISHER, stats / f"{n}.safetensors")
    bare = {n: bare_copy(p, tmp_path / "adapters" / n) for n, p in pair.items()}
    recipe = tmp_path / "fisher.yaml"
    recipe.write_text("method: fisher\n"
                      "parameters: {floor: 1.0e-5}\n"
                      "inputs:\n"
                      "  - {adapter: adapters/a, weight: 0.3, fisher: stats/a.safetensors}\n"
                      "  - {adapter: adapters/b, weight: 0.7, fisher: stats/b.safetensors}\n")
    r = cli("merge", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    ads = [lm.load(bare["a"], name="a"), lm.load(bare["b"], name="b")]
    want = lm.merge(ads, [0.3, 0.7], method="fisher", fishers=[stats / "a.safetensors", stats / "b.safetensors"],
                    floor=1e-5)
    assert_same_deltas(lm.load(tmp_path / "out"), want)
    assert f"`{sha256(originals['a'][1])}`" in stat_row(tmp_path / "out", "a")


def test_a_recipe_that_estimates_from_data(tmp_path, pair, base_folder, originals):
    bare = {n: bare_copy(p, tmp_path / n) for n, p in pair.items()}
    recipe = tmp_path / "estimate.yaml"
    recipe.write_text(f"method: fisher\n"
                      f"base_model: {base_folder}\n"
                      f"estimate: {{kind: empirical, space: factor, n_examples: 4}}\n"
                      f"inputs:\n"
                      f"  - {{adapter: a, data: {originals['a'][1]}}}\n"
                      f"  - {{adapter: b, data: {originals['b'][1]}}}\n"
                      f"expression: 0.5*a + 0.5*b\n")
    out = tmp_path / "out"
    r = cli("merge", recipe, "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert not any((tmp_path / n / FISHER).exists() for n in bare)     # estimated in memory, nothing beside
    ads = [lm.load(bare["a"], name="a"), lm.load(bare["b"], name="b")]
    fishers = lm.fisher.estimate_many(str(base_folder), ads, [originals[n][1] for n in ("a", "b")], n_examples=4,
                                      kind="empirical", space="factor", device="cpu")
    want = lm.merge(ads, [0.5, 0.5], method="fisher", fishers=fishers)
    assert_same_deltas(lm.load(out), want)
    for n in ("a", "b"):
        row = stat_row(out, n)
        assert "`empirical`" in row and "`factor`" in row and "`4`" in row
        assert f"`{sha256(originals[n][1])}`" in row

    # regmean from data: the Grams estimated in the same pass
    recipe.write_text(recipe.read_text().replace("method: fisher", "method: regmean"))
    r = cli("merge", recipe, "-o", tmp_path / "regmean", "--quiet")
    assert r.exit_code == 0, r.output
    estimated = lm.fisher.estimate_many(str(base_folder), ads, [originals[n][1] for n in ("a", "b")],
                                        n_examples=4, kind="empirical", space="factor", device="cpu", gram=True)
    want = lm.merge(ads, [0.5, 0.5], method="regmean", grams=estimated)
    assert_same_deltas(lm.load(tmp_path / "regmean"), want)


BAD_RECIPES = {
    # case: (recipe text, given {adapter} / {base} / {data} / {fisher}; the listing's line for the problem)
    "missing fisher file": ("method: fisher\n"
                            "inputs:\n"
                            "  - adapter: {adapter}\n"
                            "    fisher: nope.safetensors\n",
                            "line 4, inputs[0].fisher: {root}/nope.safetensors: no such file"),
    "data without base_model": ("method: fisher\n"
                                "inputs:\n"
                                "  - adapter: {adapter}\n"
                                "    data: {data}\n",
                                "line 4, inputs[0].data: estimating from data needs the base model; give base_model"),
    "fisher under ties": ("method: ties\n"
                          "parameters: {{density: 0.5}}\n"
                          "inputs:\n"
                          "  - {{adapter: {adapter}, fisher: {fisher}}}\n",
                          "line 4, inputs[0].fisher: method 'ties' takes no statistics (method fisher uses `fisher`)"),
    "gram under fisher": ("method: fisher\n"
                          "inputs:\n"
                          "  - {{adapter: {adapter}, gram: {fisher}}}\n",
                          "line 3, inputs[0].gram: method 'fisher' takes no statistics (method regmean uses `gram`)"),
    "unknown estimate key": ("method: fisher\n"
                             "base_model: {base}\n"
                             "estimate:\n"
                             "  kind: expected\n"
                             "  n_exampels: 4\n"
                             "inputs:\n"
                             "  - {{adapter: {adapter}, data: {data}}}\n",
                             "line 5, estimate.n_exampels: unknown key (did you mean 'n_examples'?)"),
    "bad estimate value": ("method: regmean\n"
                           "base_model: {base}\n"
                           "estimate: {{kind: fishy, n_examples: 0}}\n"
                           "inputs: [{{adapter: {adapter}, data: {data}}}]\n",
                           "line 3, estimate.kind: must be one of ['expected', 'sampled', 'empirical']"),
    "estimate under ties": ("method: ties\n"
                            "parameters: {{density: 0.5}}\n"
                            "estimate: {{kind: expected}}\n"
                            "inputs: [{adapter}]\n",
                            "line 3, estimate: method 'ties' estimates nothing"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_recipe_statistics_problems_are_reported_with_their_line(case, tmp_path, pair, base_folder, originals):
    text, expected = BAD_RECIPES[case]
    values = {"adapter": pair["a"], "base": base_folder, "data": originals["a"][1], "fisher": pair["a"] / FISHER,
              "root": tmp_path}
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text.format(**values))
    out = tmp_path / "out"
    r = cli("merge", recipe, "-o", out)
    assert r.exit_code == 2, (r.output, r.exception)
    assert expected.format(**values) in r.stderr and "Traceback" not in r.output
    assert r.stderr.startswith(f"error: {recipe}: ") and not out.exists()
    if case == "bad estimate value":                 # every problem at once
        assert "line 3, estimate.n_examples: must be >= 1" in r.stderr


# ---- 5. the registry as the CLI lists it --------------------------------------------------------------------
def test_methods_lists_fisher_and_regmean():
    r = cli("methods", "--json")
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    fisher, regmean = listed["fisher"], listed["regmean"]
    assert fisher["family"] == regmean["family"] == "data"
    assert {"normalize", "floor", "favor_target", "svd"} <= set(fisher["params"])
    assert fisher["params"]["normalize"]["default"] is True and fisher["params"]["favor_target"]["default"] is False
    assert fisher["params"]["floor"]["default"] == 1e-6
    assert set(fisher["params"]["svd"]["choices"]) == {"auto", "exact", "randomized"}
    assert regmean["params"]["alpha"]["default"] == 0.9 and "alpha" not in fisher["params"]
    assert "2111.09832" in fisher["url"] and "2212.09849" in regmean["url"]
    r = cli("methods")
    assert r.exit_code == 0 and any(line.startswith("fisher ") for line in r.stdout.splitlines())
