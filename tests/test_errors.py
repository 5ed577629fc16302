"""Bad input gives exactly one typed error (a `lora_merge.errors` class) whose message names the file and/or
module involved, and a failed save leaves nothing behind: no output folder, no hidden temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_adapter
from safetensors.torch import load_file, save_file

import lora_merge as lm
import lora_merge.io as lm_io
from lora_merge.errors import (
    AdapterLoadError,
    BaseModelMismatchError,
    ExpressionError,
    LoraMergeError,
    MethodError,
    NonFiniteError,
    OutputExistsError,
    ShapeMismatchError,
    UnsafeFileError,
    UnsupportedAdapterError,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
Q0 = "model.layers.0.self_attn.q_proj"      # the first module, in sorted order, of every adapter below
Q0_KEY = f"base_model.model.{Q0}"


# ---- helpers ----------------------------------------------------------------------------------------------
def raises(cls: type[LoraMergeError], fn, *fragments) -> LoraMergeError:
    """Run `fn`; it must raise exactly `cls` (not a parent or a sibling) with every fragment in its message."""
    with pytest.raises(LoraMergeError) as info:
        fn()
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in the message {message!r}"
    return err


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))
    return folder


def edit_tensors(folder: Path, edit) -> Path:
    """Load the folder's tensors with safetensors, let `edit` change the dict in place, and write them back."""
    tensors = {k: v.clone() for k, v in load_file(str(folder / WEIGHTS)).items()}
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


def listing(folder: Path) -> list[str]:
    """Every name in `folder`, hidden ones included."""
    return sorted(os.listdir(folder))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def same_deltas(x: lm.Adapter, y: lm.Adapter) -> None:
    assert set(x.modules) == set(y.modules)
    for m in x.modules:
        assert torch.equal(x.delta(m), y.delta(m)), m


# ---- fixtures: a few real PEFT adapters, made once ---------------------------------------------------------
@pytest.fixture(scope="module")
def srcs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("src")
    return {
        "a": make_adapter(d / "a", r=4, alpha=8, seed=1),
        "b": make_adapter(d / "b", r=4, alpha=4, seed=2),
        "r6": make_adapter(d / "r6", r=6, alpha=12, seed=3),
        "dora": make_adapter(d / "dora", r=4, alpha=8, seed=4, use_dora=True),
    }


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """An adapter for a Llama of hidden size 48 (the others: 32), with the same base model name."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.name_or_path = "tiny-llama"
    model = LlamaForCausalLM(cfg).eval()
    torch.manual_seed(5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      lora_dropout=0.0)
    path = tmp_path_factory.mktemp("wide") / "wide"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, lora).save_pretrained(str(path))
    assert json.loads((path / CONFIG).read_text())["base_model_name_or_path"] == "tiny-llama"
    return path


@pytest.fixture(scope="module")
def loaded(srcs) -> dict[str, lm.Adapter]:
    return {k: lm.load(p) for k, p in srcs.items()}


# ---- load ---------------------------------------------------------------------------------------------------
def test_load_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    err = raises(AdapterLoadError, lambda: lm.load(missing), str(missing), "no such adapter folder")
    assert err.file == str(missing)
    assert not missing.exists()


def test_load_a_file_instead_of_a_folder(srcs):
    path = srcs["a"] / WEIGHTS
    raises(AdapterLoadError, lambda: lm.load(path), str(path), "expected a PEFT adapter folder")


def test_load_folder_without_config(srcs, tmp_path):
    folder = copy(srcs["a"], tmp_path / "noconfig")
    (folder / CONFIG).unlink()
    err = raises(AdapterLoadError, lambda: lm.load(folder), str(folder / CONFIG), "missing")
    assert err.file == str(folder / CONFIG)


@pytest.mark.parametrize("text", ['{"r": 4,', "", "not json at all", "\xff\xfe"])
def test_load_invalid_json_config(srcs, tmp_path, text):
    folder = copy(srcs["a"], tmp_path / "badjson")
    (folder / CONFIG).write_bytes(text.encode("latin-1"))
    err = raises(AdapterLoadError, lambda: lm.load(folder), str(folder / CONFIG), "not valid JSON")
    assert err.file == str(folder / CONFIG)


def test_load_config_not_an_object(srcs, tmp_path):
    folder = copy(srcs["a"], tmp_path / "list")
    (folder / CONFIG).write_text("[1, 2]")
    raises(AdapterLoadError, lambda: lm.load(folder), str(folder / CONFIG), "expected a JSON object")


@pytest.mark.parametrize("peft_type", ["IA3", "loha", "PREFIX_TUNING"])
def test_load_peft_type_other_than_lora(srcs, tmp_path, peft_type):
    folder = edit_config(copy(srcs["a"], tmp_path / "ia3"), peft_type=peft_type)
    err = raises(AdapterLoadError, lambda: lm.load(folder), str(folder / CONFIG), peft_type.upper(), "LORA")
    assert err.key == "peft_type"


def test_load_no_weights_file(srcs, tmp_path):
    folder = copy(srcs["a"], tmp_path / "noweights")
    (folder / WEIGHTS).unlink()
    err = raises(AdapterLoadError, lambda: lm.load(folder), str(folder), WEIGHTS, PICKLE)
    assert err.file == str(folder / WEIGHTS)


def test_load_pickle_is_refused_unless_allowed(srcs, loaded, tmp_path, monkeypatch):
    folder = copy(srcs["a"], tmp_path / "pickled")
    torch.save(load_file(str(folder / WEIGHTS)), str(folder / PICKLE))
    (folder / WEIGHTS).unlink()

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    err = raises(UnsafeFileError, lambda: lm.load(folder), str(folder / PICKLE), "pickle", "allow_pickle=True",
                 "weights_only=True")
    assert isinstance(err, AdapterLoadError) and err.file == str(folder / PICKLE)
    assert calls == [], "the pickle was opened although the caller did not opt in"

    adapter = lm.load(folder, allow_pickle=True)
    assert len(calls) == 1 and calls[0].get("weights_only") is True
    assert PICKLE in adapter.files
    same_deltas(adapter, loaded["a"])


def test_load_pickle_that_torch_refuses(srcs, tmp_path):
    folder = copy(srcs["a"], tmp_path / "badpickle")
    (folder / WEIGHTS).unlink()
    (folder / PICKLE).write_bytes(b"certainly not a pickle")
    raises(AdapterLoadError, lambda: lm.load(folder, allow_pickle=True), str(folder / PICKLE), "weights_only=True")


@pytest.mark.parametrize("corruption", ["empty", "garbage", "truncated", "header_only"])
def test_load_corrupt_safetensors(srcs, tmp_path, corruption):
    folder = copy(srcs["a"], tmp_path / "corrupt")
    good = (folder / WEIGHTS).read_bytes()
    data = {"empty": b"", "garbage": bytes(range(256)) * 4, "truncated": good[:-17],
            "header_only": good[:8 + int.from_bytes(good[:8], "little")]}[corruption]
    (folder / WEIGHTS).write_bytes(data)
    err = raises(AdapterLoadError, lambda: lm.load(folder), str(folder / WEIGHTS), "not a readable safetensors")
    assert err.file == str(folder / WEIGHTS)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_non_finite_tensor(srcs, tmp_path, value):
    module = "model.layers.1.self_attn.v_proj"

    def poison(t):
        t[f"base_model.model.{module}.lora_B.weight"][2, 1] = value

    folder = edit_tensors(copy(srcs["a"], tmp_path / "nan"), poison)
    err = raises(NonFiniteError, lambda: lm.load(folder), str(folder / WEIGHTS), f"module {module}",
                 "NaN or Inf")
    assert err.module == module and err.file == str(folder / WEIGHTS)


@pytest.mark.parametrize("drop, missing", [("lora_B", "lora_B"), ("lora_A", "lora_A")])
def test_load_half_a_module(srcs, tmp_path, drop, missing):
    folder = edit_tensors(copy(srcs["a"], tmp_path / "half"), lambda t: t.pop(f"{Q0_KEY}.{drop}.weight"))
    err = raises(AdapterLoadError, lambda: lm.load(folder), str(folder / WEIGHTS), f"module {Q0}",
                 f"no {missing} tensor")
    assert err.module == Q0


def test_load_rank_disagrees_with_config(srcs, tmp_path):
    folder = edit_config(copy(srcs["a"], tmp_path / "r8"), r=8)
    err = raises(ShapeMismatchError, lambda: lm.load(folder), str(folder / WEIGHTS), f"module {Q0}", "rank 4",
                 "rank 8", CONFIG)
    assert err.module == Q0 and err.key == "r"


def test_load_rank_pattern_disagrees_with_tensors(srcs, tmp_path):
    module = "model.layers.1.self_attn.v_proj"
    folder = edit_config(copy(srcs["a"], tmp_path / "pattern"), rank_pattern={"layers.1.self_attn.v_proj": 2})
    err = raises(ShapeMismatchError, lambda: lm.load(folder), f"module {module}", "rank 4", "rank 2")
    assert err.module == module


def test_load_factors_of_different_ranks(srcs, tmp_path):
    def shrink(t):
        t[f"{Q0_KEY}.lora_B.weight"] = t[f"{Q0_KEY}.lora_B.weight"][:, :3].contiguous()

    folder = edit_tensors(copy(srcs["a"], tmp_path / "ragged"), shrink)
    err = raises(ShapeMismatchError, lambda: lm.load(folder), str(folder / WEIGHTS), f"module {Q0}", "(4, 32)",
                 "(32, 3)")
    assert err.module == Q0


def test_load_no_lora_tensors(srcs, tmp_path):
    folder = copy(srcs["a"], tmp_path / "nolora")
    save_file({"something.else": torch.zeros(2)}, str(folder / WEIGHTS))
    raises(AdapterLoadError, lambda: lm.load(folder), str(folder / WEIGHTS), "no LoRA tensors")


@pytest.mark.parametrize("field, value", [("r", "four"), ("r", None), ("lora_alpha", "eight")])
def test_load_non_numeric_rank_or_alpha(srcs, tmp_path, field, value):
    folder = edit_config(copy(srcs["a"], tmp_path / "nonnumeric"), **{field: value})
    raises(AdapterLoadError, lambda: lm.load(folder), str(folder / CONFIG), field)


def test_load_invalid_rank_pattern_regex(srcs, tmp_path):
    folder = edit_config(copy(srcs["a"], tmp_path / "badregex"), rank_pattern={"q_proj[": 4})
    raises(AdapterLoadError, lambda: lm.load(folder), str(folder / CONFIG), "rank_pattern")


# ---- merge --------------------------------------------------------------------------------------------------
def test_merge_shape_mismatch_names_both_sources_and_module(srcs, wide):
    a, w = lm.load(srcs["a"]), lm.load(wide)
    err = raises(ShapeMismatchError, lambda: lm.merge([a, w], method="sum"), f"module {Q0}", str(srcs["a"]),
                 str(wide), "(32, 32)", "(48, 48)")
    assert err.module == Q0 and err.file == str(wide)
    # the lazy arithmetic reports the same thing when its modules are built
    raises(ShapeMismatchError, lambda: (a + w).modules, f"module {Q0}", str(srcs["a"]), str(wide))


def test_merge_base_model_mismatch(srcs, loaded, tmp_path):
    other = lm.load(edit_config(copy(srcs["b"], tmp_path / "other"), base_model_name_or_path="other-llama"))
    a = loaded["a"]
    err = raises(BaseModelMismatchError, lambda: lm.merge([a, other]), f"{a.source} (base tiny-llama)",
                 f"{other.source} (base other-llama)", "allow_base_mismatch=True")
    assert err.file == other.source
    raises(BaseModelMismatchError, lambda: a + other, "tiny-llama", "other-llama")
    merged = lm.merge([a, other], allow_base_mismatch=True)
    expected = lm.merge([a, loaded["b"]])
    for m in expected.modules:
        torch.testing.assert_close(merged.delta(m), expected.delta(m))


def test_merge_unknown_method_suggests_close_name(loaded):
    adapters = [loaded["a"], loaded["b"]]
    err = raises(MethodError, lambda: lm.merge(adapters, method="tie"), "unknown merge method 'tie'",
                 "did you mean 'ties'?", "known methods:", "ties_svd")
    assert err.key == "method"
    err = raises(MethodError, lambda: lm.merge(adapters, method="zzzzzz"), "'zzzzzz'", "known methods:")
    assert "did you mean" not in str(err)


def test_merge_unknown_parameter(loaded):
    err = raises(MethodError, lambda: lm.merge([loaded["a"], loaded["b"]], method="ties", density=0.5, dnsity=0.5),
                 "method 'ties' has no parameter 'dnsity'", "density", "majority_sign_method")
    assert err.key == "dnsity"
    raises(MethodError, lambda: lm.merge([loaded["a"]], method="cat", rank=4), "method 'cat' has no parameter 'rank'")


def test_merge_missing_required_parameter(loaded):
    err = raises(MethodError, lambda: lm.merge([loaded["a"], loaded["b"]], method="ties"),
                 "method 'ties' needs the parameter 'density'")
    assert err.key == "density"


@pytest.mark.parametrize("density", [1.5, -0.1])
def test_merge_density_out_of_range(loaded, density):
    err = raises(MethodError, lambda: lm.merge([loaded["a"], loaded["b"]], method="ties", density=density),
                 "density must be in [0, 1]", str(density))
    assert err.key == "density"


@pytest.mark.parametrize("params, fragment", [
    ({"majority_sign_method": "median"}, "majority_sign_method must be one of"),
    ({"density": "half"}, "density must be float"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"energy": 1.5}, "energy must be in (0, 1]"),
])
def test_merge_invalid_parameter_values(loaded, params, fragment):
    kwargs = {"density": 0.5, **params}
    raises(MethodError, lambda: lm.merge([loaded["a"], loaded["b"]], method="ties", **kwargs), fragment)


def test_merge_linear_needs_equal_ranks(loaded):
    err = raises(MethodError, lambda: lm.merge([loaded["a"], loaded["r6"]], method="linear"), f"module {Q0}",
                 "a: r=4", "r6: r=6", "'svd'")
    assert err.module == Q0
    assert lm.merge([loaded["a"], loaded["r6"]], method="svd").modules   # what the message recommends works


@pytest.mark.parametrize("weights, fragment", [([1.0], "got 1 weights for 2 adapters"),
                                               ([1.0, 2.0, 3.0], "got 3 weights for 2 adapters"),
                                               ([1.0, float("nan")], "finite"),
                                               ({"a": 1.0, "zz": 2.0}, "zz")])
def test_merge_bad_weights(loaded, weights, fragment):
    err = raises(MethodError, lambda: lm.merge([loaded["a"], loaded["b"]], weights), fragment)
    assert err.key == "weights"


def test_merge_nothing(loaded):
    raises(MethodError, lambda: lm.merge([]), "at least one adapter")


@pytest.mark.parametrize("method, params", [("sum", {}), ("svd", {}), ("linear", {}), ("ties", {"density": 0.5}),
                                            ("ties_svd", {"density": 0.5})])
def test_merge_refuses_dora(srcs, loaded, method, params):
    dora = lm.load(srcs["dora"])                      # loading a DoRA adapter works
    assert all(w.magnitude is not None for w in dora.modules.values())
    assert set(dora.modules) == set(loaded["a"].modules)
    err = raises(UnsupportedAdapterError, lambda: lm.merge([loaded["a"], dora], method=method, **params),
                 "'dora'", "DoRA", f"module {Q0}")
    assert err.module == Q0
    raises(UnsupportedAdapterError, lambda: (dora + loaded["a"]).modules, "DoRA", f"module {Q0}")
    raises(UnsupportedAdapterError, lambda: dora.compress(rank=2), "DoRA", f"module {Q0}")


def test_merge_refuses_dora_error_file_is_the_source(srcs, loaded):
    dora = lm.load(srcs["dora"])
    err = raises(UnsupportedAdapterError, lambda: lm.merge([loaded["a"], dora]), "DoRA")
    assert err.file == str(srcs["dora"])


# ---- expressions ----------------------------------------------------------------------------------------------
def check_caret(err: ExpressionError, expression: str, column: int) -> None:
    """The message is `... at column N`, the expression, and a caret under column N (both indented by 2)."""
    lines = str(err).split("\n")
    assert len(lines) == 3, lines
    assert lines[0].endswith(f" at column {column}"), lines[0]
    assert lines[1] == f"  {expression}"
    assert lines[2] == "  " + " " * (column - 1) + "^"


def test_compose_unknown_name(loaded):
    expression = "0.5*a + 0.5*c"
    err = raises(ExpressionError, lambda: lm.compose(expression, a=loaded["a"], b=loaded["b"]),
                 "unknown adapter 'c'", "known: a, b")
    check_caret(err, expression, 13)
    assert err.key == expression


@pytest.mark.parametrize("expression, column, fragment", [
    ("0.5*a + * b", 9, "expected a number, an adapter name or '('"),
    ("a $ b", 3, "unexpected character '$'"),
    ("(a + b", 7, "missing ')'"),
    ("a b", 3, "unexpected 'b'"),
    ("0.5*a +", 8, "unexpected end"),
    ("a * b", 3, "cannot multiply two adapters"),
    ("a + 1", 3, "cannot add a number to an adapter"),
    ("a / 0", 3, "division by zero"),
    ("2 / a", 3, "cannot divide by an adapter"),
    ("   ", 1, "empty expression"),
])
def test_compose_syntax_errors(loaded, expression, column, fragment):
    err = raises(ExpressionError, lambda: lm.compose(expression, a=loaded["a"], b=loaded["b"]), fragment)
    check_caret(err, expression, column)


def test_compose_expression_without_adapter(loaded):
    raises(ExpressionError, lambda: lm.compose("2 * 3", a=loaded["a"]), "names no adapter")


# ---- save -------------------------------------------------------------------------------------------------------
@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "outputs"
    d.mkdir()
    return d


def test_save_refuses_existing_folder(loaded, outdir):
    out = outdir / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    err = raises(OutputExistsError, lambda: loaded["a"].save(out), str(out), "force=True")
    assert err.file == str(out)
    assert snapshot(out) == before
    assert listing(outdir) == ["merged"]
    raises(OutputExistsError, lambda: lm.save(loaded["a"], out), str(out))
    assert snapshot(out) == before


def test_save_force_replaces_existing_folder(loaded, outdir):
    out = outdir / "merged"
    loaded["b"].save(out)
    (out / "keep.txt").write_text("stale")
    loaded["a"].save(out, force=True)
    assert listing(out) == ["README.md", CONFIG, WEIGHTS]
    assert listing(outdir) == ["merged"]
    same_deltas(lm.load(out), loaded["a"])


def test_force_never_replaces_what_is_not_an_adapter_folder(loaded, outdir):
    project = outdir / "project"
    project.mkdir()
    (project / "code.py").write_text("precious")
    (outdir / "notes.txt").write_text("a file")
    for target in (project, outdir / "notes.txt"):
        err = raises(OutputExistsError, lambda t=target: loaded["a"].save(t, force=True), str(target),
                     "not an adapter folder")
        assert err.file == str(target)
    assert (project / "code.py").read_text() == "precious" and (outdir / "notes.txt").read_text() == "a file"


@pytest.mark.parametrize("existing", [False, True])
def test_save_failure_midway_leaves_nothing(loaded, outdir, monkeypatch, existing):
    out = outdir / "merged"
    if existing:
        loaded["b"].save(out)
        (out / "keep.txt").write_text("precious")
    before = snapshot(out) if existing else None

    def broken(filename, tensors, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lm_io.stfile, "write", broken)
    with pytest.raises(OSError, match="No space left"):
        loaded["a"].save(out, force=existing)
    if existing:
        assert snapshot(out) == before
        assert listing(outdir) == ["merged"]
    else:
        assert listing(outdir) == []


def test_save_force_failed_final_rename_keeps_old_folder(loaded, outdir, monkeypatch):
    out = outdir / "merged"
    loaded["b"].save(out)
    (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:               # old -> aside worked; tmp -> out fails
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(lm_io.os, "replace", flaky)
    with pytest.raises(OSError):
        loaded["a"].save(out, force=True)
    monkeypatch.undo()
    assert listing(outdir) == ["merged"]
    assert snapshot(out) == before


def test_save_non_finite_result(loaded, outdir):
    out = outdir / "merged"
    bad = loaded["a"] * float("inf")
    err = raises(NonFiniteError, lambda: bad.save(out), "module model.layers.", "NaN or Inf")
    assert err.module in loaded["a"].modules
    assert listing(outdir) == []


def test_save_empty_result(loaded, outdir):
    a = loaded["a"]
    raises(LoraMergeError, lambda: (a - a).save(outdir / "merged"), "no modules")
    assert listing(outdir) == []


def test_save_unknown_dtype(loaded, outdir):
    err = raises(LoraMergeError, lambda: loaded["a"].save(outdir / "merged", dtype="float8"), "unknown dtype",
                 "'float8'", "bfloat16")
    assert err.key == "dtype"
    assert listing(outdir) == []


def test_every_error_is_a_lora_merge_error():
    for name in lm.__all__:
        obj = getattr(lm, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, LoraMergeError), name


# ---- values that once escaped as bare Python exceptions ---------------------------------------------------------
@pytest.mark.parametrize("weights", [["0.5x", 1], 0.5, {"a": float("nan")}])
def test_merge_bad_weight_values(loaded, weights):
    raises(MethodError, lambda: lm.merge([loaded["a"], loaded["b"]], weights), "weights")


@pytest.mark.parametrize("params", [{"seed": 2**70}, {"rank": float("inf")}, {"energy": float("nan")}])
def test_merge_out_of_range_parameters(loaded, params):
    key = next(iter(params))
    err = raises(MethodError, lambda: lm.merge([loaded["a"], loaded["b"]], None, "dare_ties_svd", density=0.5,
                                               **params), key)
    assert err.key == key


def test_arithmetic_and_compress_bad_values(loaded):
    a = loaded["a"]
    raises(MethodError, lambda: a / 0, "zero")
    raises(MethodError, lambda: a.compress(rank=2.5), "rank")
    raises(MethodError, lambda: lm.merge([a - a], None, "svd"), "no modules")


def test_merge_accepts_paths_and_refuses_other_objects(srcs, loaded):
    by_path = lm.merge([srcs["a"], str(srcs["b"])], [0.5, 0.5])
    direct = lm.merge([loaded["a"], loaded["b"]], [0.5, 0.5])
    torch.testing.assert_close(by_path.delta(Q0), direct.delta(Q0))
    raises(MethodError, lambda: lm.merge([42]), "int")


def test_load_pattern_key_that_peft_cannot_compile(srcs, tmp_path):
    """'(?i)q' compiles alone but not inside PEFT's (.*\\.)?(key)$ wrapper."""
    path = edit_config(copy(srcs["a"], tmp_path / "flags"), rank_pattern={"(?i)Q_PROJ": 4})
    raises(AdapterLoadError, lambda: lm.load(path), "rank_pattern", "regular expression")
