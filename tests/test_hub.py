"""lora_merge.hub against the fake Hub (tests/hub_server.py): downloads through `load`, pushes, their errors,
offline mode, and the CLI end to end in subprocesses. No network: everything goes to 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import TEST_TOKEN, FakeHub
from hub_server import fake_hub as fake_hub_fixture  # noqa: F401 - the `fake_hub` fixture
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from typer.testing import CliRunner

import lora_merge as lm
from lora_merge import __version__
from lora_merge.cli import app
from lora_merge.errors import AdapterLoadError, HubError, LoraMergeError
from lora_merge.hub import download, push

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adapters"
RECIPE = ROOT / "recipes" / "task_arithmetic.yaml"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
JUNK = {"optimizer.pt": b"\0" * (4 << 20), "training_args.bin": b"\1" * 4096}  # in training repos; never fetched
WRONG_TOKEN = "hf_wrongTokenForTheTests123"
USER_AGENT = f"lora-merge/{__version__}"
SEED_CARD = b"---\nlibrary_name: peft\n---\n# A LoRA on the fake Hub\n"


# ---- helpers -------------------------------------------------------------------------------------------------
def example_files(name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (EXAMPLES / name).iterdir()}


def folder_files(folder: Path, names=ADAPTER_FILES) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seed_arith(hub: FakeHub) -> str:
    """org/arith: `addition` on main (with a card and training junk), `subtraction`'s files on branch v2.
    Returns main's commit sha."""
    sha = hub.add_repo("org/arith", files={**example_files("addition"), "README.md": SEED_CARD, **JUNK})
    hub.add_repo("org/arith", files=example_files("subtraction"), branch="v2")
    return sha


def resolved(hub: FakeHub, start: int = 0) -> list[str]:
    """File paths asked for with HEAD or GET .../resolve/{rev}/{path}, in order."""
    out = []
    for method, path, _ in hub.requests[start:]:
        m = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+?)(\?.*)?$", path)
        if method in ("HEAD", "GET") and m:
            out.append(m.group(1))
    return out


def assert_same_tensors(a: lm.Adapter, b: lm.Adapter) -> None:
    assert set(a.modules) == set(b.modules) and a.modules
    for m, wa in a.modules.items():
        wb = b.modules[m]
        assert wa.scale == wb.scale and torch.equal(wa.A, wb.A) and torch.equal(wa.B, wb.B), m


def assert_clean_one_line(e: BaseException, *needles: str) -> None:
    """One line naming what it is about, and no token anywhere in it."""
    text = str(e)
    assert text and "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    for token in (TEST_TOKEN, WRONG_TOKEN):
        assert token not in text and token not in repr(e)


def merged_folder(tmp_path: Path, name: str = "merged") -> Path:
    """addition and subtraction, 0.7 each, summed exactly and saved with its card."""
    adapters = [lm.load(EXAMPLES / "addition"), lm.load(EXAMPLES / "subtraction")]
    out = tmp_path / name
    lm.merge(adapters, [0.7, 0.7], "sum", name="arith").save(out)
    return out


def saved_copy(tmp_path: Path, name: str) -> Path:
    """An example adapter saved by lora-merge (so with a README.md card)."""
    out = tmp_path / name
    lm.load(EXAMPLES / name).save(out)
    return out


def reproduce_recipe(card: str) -> dict:
    block = card.split("## Reproduce", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def cli(env: dict[str, str], cwd: Path, *runs: list[str]) -> list[subprocess.CompletedProcess]:
    """Run `python -m lora_merge.cli ARGS` once per run, all at once (each pays for importing torch)."""
    procs = [subprocess.Popen([sys.executable, "-m", "lora_merge.cli", *args], env=env, cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in runs]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for r in done:
        assert TEST_TOKEN not in r.stdout + r.stderr, r.args
    return done


def cli_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {**os.environ, **hub.env(home)}
    env.pop("LORA_MERGE_DEBUG", None)
    return env


# ---- 1. download -------------------------------------------------------------------------------------------
def test_load_from_the_hub_gives_the_local_tensors_and_fetches_only_adapter_files(fake_hub):
    main_sha = seed_arith(fake_hub)
    addition, subtraction = lm.load(EXAMPLES / "addition"), lm.load(EXAMPLES / "subtraction")

    a = lm.load("org/arith")
    assert_same_tensors(a, addition)
    assert (a.name, a.source, a.revision) == ("arith", "org/arith", None)
    assert a.config == json.loads(example_files("addition")["adapter_config.json"])
    v2 = lm.load("org/arith@v2")                       # the branch holds other weights: the revision is honoured
    assert_same_tensors(v2, subtraction)
    assert (v2.name, v2.source, v2.revision) == ("arith", "org/arith@v2", "v2")
    assert_same_tensors(lm.load("org/arith", revision=main_sha), addition)   # a commit sha works too
    assert lm.load("org/arith", revision="v2").revision == "v2"

    fetched = resolved(fake_hub)
    assert set(fetched) == set(ADAPTER_FILES)          # the card comes along; optimizer.pt and the rest do not
    assert not set(fetched) & set(JUNK)
    assert all(USER_AGENT in h.get("user-agent", "") for m, p, h in fake_hub.requests if "/resolve/" in p)


def test_hub_revision_goes_to_provenance_and_card_not_to_the_base_revision(fake_hub, tmp_path):
    seed_arith(fake_hub)
    a = lm.load("org/arith@v2")
    assert a.revision == "v2" and a.config.get("revision") is None
    merged = lm.merge([a, lm.load(EXAMPLES / "intent")], [1.0, 0.5], "sum")
    record = merged.provenance["inputs"][0]
    local = example_files("subtraction")
    head = next(c["sha"] for c in reversed(fake_hub.repos["org/arith"].commits) if c["branch"] == "v2")
    assert (record["source"], record["revision"], record["commit"]) == ("org/arith@v2", "v2", head)
    assert record["files"] == {n: sha256(local[n]) for n in ("adapter_config.json", "adapter_model.safetensors")}

    merged.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config.get("revision") is None              # PEFT's `revision` is the base model's, not the adapter's
    assert config["base_model_name_or_path"] == BASE
    card = (tmp_path / "out" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| arith |"))
    assert f"| org/arith | v2 (commit {head}) |" in row   # source and revision columns, the commit pinned
    assert sha256(local["adapter_model.safetensors"]) in row and sha256(local["adapter_config.json"]) in row
    assert reproduce_recipe(card)["inputs"][0]["adapter"] == f"org/arith@{head}"   # remakes this exact merge


def test_allow_pickle_adds_adapter_model_bin_to_the_download(fake_hub, tmp_path):
    tensors = load_file(str(EXAMPLES / "intent" / "adapter_model.safetensors"))
    torch.save(tensors, tmp_path / "adapter_model.bin")
    fake_hub.add_repo("org/pickled", files={"adapter_config.json": example_files("intent")["adapter_config.json"],
                                            "adapter_model.bin": (tmp_path / "adapter_model.bin").read_bytes(),
                                            **JUNK})
    with pytest.raises(LoraMergeError):
        lm.load("org/pickled")                        # the pickle is neither fetched nor read without opt-in
    assert "adapter_model.bin" not in resolved(fake_hub)

    start = len(fake_hub.requests)
    a = lm.load("org/pickled", allow_pickle=True)
    assert "adapter_model.bin" in resolved(fake_hub, start) and not set(resolved(fake_hub, start)) & set(JUNK)
    assert_same_tensors(a, lm.load(EXAMPLES / "intent"))
    assert set(a.files) == {"adapter_config.json", "adapter_model.bin"}


# ---- 2. download errors ------------------------------------------------------------------------------------
def test_download_errors_are_one_line_and_name_the_repo(fake_hub, monkeypatch):
    seed_arith(fake_hub)
    fake_hub.add_repo("org/noweights", files={"adapter_config.json": example_files("addition")["adapter_config.json"],
                                              "README.md": SEED_CARD})

    with pytest.raises(HubError) as e:
        lm.load("org/missing")
    assert_clean_one_line(e.value, "org/missing", "no such repo")
    with pytest.raises(HubError) as e:
        lm.load("org/arith@nope")
    assert_clean_one_line(e.value, "org/arith@nope", "revision")
    with pytest.raises(LoraMergeError) as e:
        lm.load("org/noweights")
    assert isinstance(e.value, AdapterLoadError)
    assert_clean_one_line(e.value, "adapter_model.safetensors")

    # A refused token, given to download() or through HF_TOKEN: a 401, and no token in the message.
    with pytest.raises(HubError) as e:
        download("org/arith", token=WRONG_TOKEN)
    assert_clean_one_line(e.value, "org/arith", "401")
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    with pytest.raises(HubError) as e:
        lm.load("org/arith@v2")
    assert_clean_one_line(e.value, "org/arith@v2", "401", "HF_TOKEN")
    assert not [p for _, p, _ in fake_hub.requests if p.startswith("/org/arith/resolve/")]  # nothing fetched


def test_missing_weights_error_names_the_repo(fake_hub):
    fake_hub.add_repo("org/noweights", files={"adapter_config.json": example_files("addition")["adapter_config.json"]})
    with pytest.raises(LoraMergeError) as e:
        lm.load("org/noweights@main")
    assert_clean_one_line(e.value, "adapter_model.safetensors")
    assert "org/noweights" in str(e.value)


# ---- 3. offline --------------------------------------------------------------------------------------------
def test_offline_at_call_time_loads_from_the_cache(fake_hub, monkeypatch):
    from huggingface_hub import constants

    seed_arith(fake_hub)
    online, online_v2 = lm.load("org/arith"), lm.load("org/arith@v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # after import: huggingface_hub's own flag stays off
    assert constants.HF_HUB_OFFLINE is False
    start = len(fake_hub.requests)
    offline, offline_v2 = lm.load("org/arith"), lm.load("org/arith@v2")
    assert len(fake_hub.requests) == start              # not one request
    assert_same_tensors(offline, online)
    assert_same_tensors(offline_v2, online_v2)
    assert offline_v2.revision == "v2"


def test_offline_without_a_cached_copy_says_so(fake_hub, monkeypatch):
    seed_arith(fake_hub)                               # on the Hub, but never downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as e:
        lm.load("org/arith")
    assert fake_hub.requests == []
    assert_clean_one_line(e.value, "org/arith")
    assert "offline" in str(e.value).lower()


# ---- 4. push -----------------------------------------------------------------------------------------------
def test_push_uploads_exactly_the_adapter_files_in_one_commit(fake_hub, tmp_path):
    out = merged_folder(tmp_path)
    local = folder_files(out)
    assert set(local) == set(ADAPTER_FILES)
    (out / "notes.txt").write_text("not for the Hub")
    (out / "optimizer.pt").write_bytes(b"\0" * 1024)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "adapter_model.safetensors").write_bytes(local["adapter_model.safetensors"])

    url = push(out, "me/merged")
    repo = fake_hub.repos["me/merged"]
    assert url == f"{fake_hub.url}/me/merged/commit/{repo.heads['main']}"
    assert repo.branches == {"main": local} and not repo.private
    assert [c["message"] for c in repo.commits] == ["initial commit", "Upload merged made with lora-merge"]
    assert sum(m == "POST" and "/commit/" in p for m, p, _ in fake_hub.requests) == 1
    assert fake_hub.requests and all(USER_AGENT in h.get("user-agent", "") for _, p, h in fake_hub.requests
                                     if not p.startswith("/api/agent-harnesses"))

    card = ModelCard(repo.branches["main"]["README.md"].decode())
    data = card.data.to_dict()
    assert data["base_model"] == BASE and data["library_name"] == "peft"
    assert {"lora", "lora-merge", "sum", f"base_model:adapter:{BASE}"} <= set(data["tags"])
    body = card.text
    for name in ("addition", "subtraction"):
        files = example_files(name)
        row = next(line for line in body.splitlines() if line.startswith(f"| {name} | 0.7 |"))
        assert sha256(files["adapter_model.safetensors"]) in row and sha256(files["adapter_config.json"]) in row
    recipe = reproduce_recipe(body)
    assert recipe["method"] == "sum" and [i["weight"] for i in recipe["inputs"]] == [0.7, 0.7]
    assert [Path(i["adapter"]).name for i in recipe["inputs"]] == ["addition", "subtraction"]


def test_push_private_to_a_branch_with_a_message(fake_hub, tmp_path):
    first, second = saved_copy(tmp_path, "addition"), saved_copy(tmp_path, "subtraction")
    push(first, "me/secret", private=True)
    assert fake_hub.repos["me/secret"].private

    push(first, "me/repo")
    repo = fake_hub.repos["me/repo"]
    main_head = repo.heads["main"]
    url = push(second, "me/repo", revision="exp", commit_message="try the other one")
    assert url.endswith(repo.heads["exp"])
    assert repo.branches["main"] == folder_files(first) and repo.heads["main"] == main_head
    assert repo.branches["exp"] == folder_files(second)
    assert (repo.commits[-1]["branch"], repo.commits[-1]["message"]) == ("exp", "try the other one")

    push(second, "me/fresh", revision="feature/x")     # a new repo: the branch starts from the empty main
    assert fake_hub.repos["me/fresh"].branches == {"main": {}, "feature/x": folder_files(second)}


# ---- 5. push failures --------------------------------------------------------------------------------------
def test_failed_commit_on_a_new_repo_leaves_no_repo(fake_hub, tmp_path):
    folder = saved_copy(tmp_path, "addition")
    fake_hub.fail("commit", 500)
    with pytest.raises(HubError) as e:
        push(folder, "me/new")
    assert_clean_one_line(e.value, "me/new", "500")
    assert "me/new" not in fake_hub.repos               # created, then deleted again: no partial state
    assert ("DELETE", "/api/repos/delete") in [(m, p) for m, p, _ in fake_hub.requests]


def test_failed_commit_on_an_existing_repo_keeps_its_files(fake_hub, tmp_path):
    first, second = saved_copy(tmp_path, "addition"), saved_copy(tmp_path, "subtraction")
    push(first, "me/kept")
    repo = fake_hub.repos["me/kept"]
    before, commits = dict(repo.branches["main"]), len(repo.commits)
    start = len(fake_hub.requests)
    fake_hub.fail("commit", 500)
    with pytest.raises(HubError) as e:
        push(second, "me/kept")
    assert_clean_one_line(e.value, "me/kept", "500")
    assert fake_hub.repos["me/kept"] is repo and repo.branches["main"] == before and len(repo.commits) == commits
    assert "DELETE" not in [m for m, _, _ in fake_hub.requests[start:]]   # never deletes a repo it did not create


def test_refused_create_is_a_clear_error(fake_hub, tmp_path):
    folder = saved_copy(tmp_path, "addition")
    fake_hub.fail("create", 403)
    with pytest.raises(HubError) as e:
        push(folder, "me/denied")
    assert_clean_one_line(e.value, "me/denied", "403", "HF_TOKEN")
    assert "me/denied" not in fake_hub.repos
    assert not any("/commit/" in p for _, p, _ in fake_hub.requests)


def test_refused_create_neither_deletes_nor_claims_a_repo(fake_hub, tmp_path):
    folder = saved_copy(tmp_path, "addition")
    fake_hub.fail("create", 403)
    with pytest.raises(HubError) as e:
        push(folder, "me/denied")
    assert "DELETE" not in [m for m, _, _ in fake_hub.requests]
    assert "created" not in str(e.value) and "deleted" not in str(e.value)


def test_a_folder_that_is_not_an_adapter_is_refused_before_any_request(fake_hub, tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(example_files("addition")["adapter_config.json"])
    (folder / "README.md").write_bytes(SEED_CARD)
    with pytest.raises(AdapterLoadError) as e:
        push(folder, "me/half")
    assert_clean_one_line(e.value, "adapter_model.safetensors")
    assert fake_hub.requests == [] and fake_hub.repos == {}


def test_a_missing_relative_folder_is_refused_before_any_request(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraMergeError) as e:
        push(Path("out/merged"), "me/merged")
    assert fake_hub.requests == []
    assert "no such adapter folder" in str(e.value)


# ---- 6. the CLI in subprocesses ----------------------------------------------------------------------------
def test_cli_merge_push_to_hub_and_push_to_a_branch(fake_hub, tmp_path):
    out, saved = tmp_path / "ta", saved_copy(tmp_path, "intent")
    merge_run, push_run = cli(cli_env(fake_hub, tmp_path / "home"), tmp_path,
                              ["merge", str(RECIPE), "-o", str(out), "--push-to-hub", "me/ta", "--json"],
                              ["push", str(saved), "me/x", "--revision", "b1", "--commit-message", "hello", "--json"])

    assert merge_run.returncode == 0, merge_run.stderr
    summary = json.loads(merge_run.stdout)
    repo = fake_hub.repos["me/ta"]
    assert summary["pushed"] == f"{fake_hub.url}/me/ta/commit/{repo.heads['main']}"
    assert repo.branches["main"] == folder_files(out) and set(repo.branches["main"]) == set(ADAPTER_FILES)
    assert RECIPE.read_text().rstrip("\n") in repo.branches["main"]["README.md"].decode()

    assert push_run.returncode == 0, push_run.stderr
    result = json.loads(push_run.stdout)
    repo = fake_hub.repos["me/x"]
    assert result == {"folder": str(saved), "repo_id": "me/x", "revision": "b1",
                      "commit_url": f"{fake_hub.url}/me/x/commit/{repo.heads['b1']}"}
    assert repo.branches == {"main": {}, "b1": folder_files(saved)}
    assert repo.commits[-1]["message"] == "hello"


def test_cli_hub_errors_are_one_line_exit_2_and_never_show_the_token(fake_hub, tmp_path):
    saved = saved_copy(tmp_path, "addition")
    fake_hub.fail("commit", 500, times=2)              # the two pushes below
    missing, failed, debug = cli(cli_env(fake_hub, tmp_path / "home"), tmp_path,
                                 ["inspect", "org/missing"],
                                 ["push", str(saved), "me/fails", "--quiet"],
                                 ["--debug", "push", str(saved), "me/fails-too", "--quiet"])
    for r, needles in ((missing, ("org/missing",)), (failed, ("me/fails", "500"))):
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert all(n in r.stderr for n in needles) and "Traceback" not in r.stderr
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert "HubError" in debug.stderr and "500" in debug.stderr
    assert "me/fails" not in fake_hub.repos and "me/fails-too" not in fake_hub.repos


# ---- 7. round trip -----------------------------------------------------------------------------------------
def test_pushed_adapter_loads_back_with_the_same_deltas(fake_hub, tmp_path):
    out = merged_folder(tmp_path)
    push(out, "me/merged")
    local, remote = lm.load(out), lm.load("me/merged")
    assert_same_tensors(remote, local)
    for m in list(local.modules)[:4]:
        assert torch.equal(remote.delta(m), local.delta(m))
    assert remote.config == local.config and remote.files == local.files


def test_private_does_not_silently_leave_an_existing_repo_public(fake_hub, tmp_path):
    from lora_merge.errors import HubError
    from lora_merge.hub import push
    lm.merge([lm.load(EXAMPLES / "intent")], [1.0]).save(tmp_path / "out")
    push(tmp_path / "out", "me/public")
    with pytest.raises(HubError, match="exists and is public"):
        push(tmp_path / "out", "me/public", private=True)
    assert not fake_hub.repos["me/public"].private


def test_names_that_merely_start_with_hf_are_not_scrubbed(tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "hf_checkpoints" / "adapter1")])
    assert r.exit_code == 2 and "hf_checkpoints/adapter1: no such adapter folder" in r.stderr
