"""The fake Hub (tests/hub_server.py), driven by huggingface_hub itself, in process and in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hub_server import TEST_TOKEN, FakeHub
from hub_server import fake_hub as fake_hub_fixture  # noqa: F401 - the `fake_hub` fixture
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json", "README.md"]


@pytest.fixture
def adapter_folder(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"base_model.model.q_proj.lora_A.weight": torch.randn(4, 32),
               "base_model.model.q_proj.lora_B.weight": torch.randn(32, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# An adapter\n")
    (folder / "notes.txt").write_text("not for the Hub")
    return folder


def local_files(folder: Path, names=ADAPTER_FILES) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def assert_no_token(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)
    assert TEST_TOKEN not in text and "hf_wrong_token" not in text


def transfer_requests(hub: FakeHub) -> list[str]:
    """Requests for an LFS batch or a Xet token: none may be made."""
    return [path for _, path, _ in hub.requests if ".git/info/lfs" in path or re.search(r"/xet-\w+-token", path)]


def status_of(exc: HfHubHTTPError) -> int:
    return exc.response.status_code


def test_create_repo_exist_ok_and_info(fake_hub):
    api = HfApi()
    url = api.create_repo("org/new", private=True)
    assert url.repo_id == "org/new" and url.startswith(fake_hub.url)
    repo = fake_hub.repos["org/new"]
    assert repo.private and repo.branches == {"main": {}}

    assert api.create_repo("org/new", exist_ok=True).repo_id == "org/new"  # the 409 path
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("org/new")
    assert status_of(e.value) == 409
    assert_no_token(e.value)

    assert api.repo_exists("org/new") and not api.repo_exists("org/other")
    info = api.model_info("org/new")
    assert info.sha == repo.heads["main"] and len(info.sha) == 40 and info.private and info.siblings == []
    assert all(h.get("authorization") == f"Bearer {TEST_TOKEN}" for _, _, h in fake_hub.requests)


def test_upload_folder_sends_every_file_inline(fake_hub, adapter_folder):
    save_file({"w": torch.zeros(3_000_000)}, str(adapter_folder / "big.safetensors"))  # 12 MB: LFS-sized on the Hub
    api = HfApi()
    api.create_repo("org/ad", exist_ok=True)
    info = api.upload_folder(folder_path=str(adapter_folder), repo_id="org/ad", commit_message="first push",
                             allow_patterns=[*ADAPTER_FILES, "big.safetensors"])
    repo = fake_hub.repos["org/ad"]
    assert repo.branches["main"] == local_files(adapter_folder, [*ADAPTER_FILES, "big.safetensors"])
    assert info.oid == repo.heads["main"] and repo.commits[-1]["message"] == "first push"
    assert sum("/commit/main" in path for _, path, _ in fake_hub.requests) == 1
    assert ("POST", "/api/validate-yaml") in [(m, path) for m, path, _ in fake_hub.requests]  # README.md check
    assert transfer_requests(fake_hub) == []


def test_upload_unchanged_files_makes_no_commit(fake_hub, adapter_folder):
    api = HfApi()
    api.create_repo("org/ad")
    api.upload_folder(folder_path=str(adapter_folder), repo_id="org/ad", allow_patterns=ADAPTER_FILES)
    head = fake_hub.repos["org/ad"].heads["main"]
    info = api.upload_folder(folder_path=str(adapter_folder), repo_id="org/ad", allow_patterns=ADAPTER_FILES)
    assert info.oid == head and len(fake_hub.repos["org/ad"].commits) == 2  # initial commit + the first push


def test_upload_to_a_new_branch(fake_hub, adapter_folder):
    api = HfApi()
    api.create_repo("org/ad")
    main_head = fake_hub.repos["org/ad"].heads["main"]
    api.create_branch("org/ad", branch="exp/v1", exist_ok=True)
    api.create_branch("org/ad", branch="exp/v1", exist_ok=True)
    api.upload_folder(folder_path=str(adapter_folder), repo_id="org/ad", revision="exp/v1",
                      commit_message="on a branch", allow_patterns=ADAPTER_FILES)
    repo = fake_hub.repos["org/ad"]
    assert repo.branches["main"] == {} and repo.heads["main"] == main_head
    assert repo.branches["exp/v1"] == local_files(adapter_folder)
    assert repo.commits[-1]["branch"] == "exp/v1"
    assert api.model_info("org/ad", revision="exp/v1").sha == repo.heads["exp/v1"]
    path = hf_hub_download("org/ad", "adapter_config.json", revision="exp/v1")
    assert Path(path).read_bytes() == (adapter_folder / "adapter_config.json").read_bytes()


def test_snapshot_download_fetches_only_allowed_files(fake_hub, tmp_path):
    files = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": os.urandom(5000),
             "README.md": b"# card", "sub/extra.bin": b"x" * 10}
    sha = fake_hub.add_repo("org/seed", files=files)
    folder = Path(snapshot_download("org/seed", revision="main",
                                    allow_patterns=["adapter_config.json", "adapter_model.safetensors"]))
    assert folder.name == sha
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == files[name]
    fetched = [p for m, p, _ in fake_hub.requests if m == "GET" and "/resolve/" in p]
    assert len(fetched) == 2

    fake_hub.add_repo("org/seed", files={"adapter_config.json": b'{"r": 8}'})  # main moves on; the old sha stays
    old = snapshot_download("org/seed", revision=sha, allow_patterns=["*.json"], cache_dir=tmp_path / "c2")
    assert (Path(old) / "adapter_config.json").read_bytes() == b'{"r": 4}'
    assert Path(hf_hub_download("org/seed", "sub/extra.bin")).read_bytes() == b"x" * 10


def test_missing_repo_revision_and_file(fake_hub):
    fake_hub.add_repo("org/seed", files={"a.json": b"{}"})
    errors = []
    for call in (lambda: snapshot_download("org/missing"), lambda: HfApi().model_info("org/missing"),
                 lambda: hf_hub_download("org/missing", "a.json")):
        with pytest.raises(RepositoryNotFoundError) as e:
            call()
        errors.append(e.value)
    for call in (lambda: snapshot_download("org/seed", revision="nope"),
                 lambda: HfApi().model_info("org/seed", revision="nope"),
                 lambda: hf_hub_download("org/seed", "a.json", revision="nope")):
        with pytest.raises(RevisionNotFoundError) as e:
            call()
        errors.append(e.value)
    with pytest.raises(EntryNotFoundError) as e:
        hf_hub_download("org/seed", "missing.json")
    errors.append(e.value)
    for error in errors:
        assert_no_token(error)


@pytest.mark.parametrize("token", ["hf_wrong_token", False])
def test_wrong_or_missing_token_is_401(fake_hub, token):
    fake_hub.add_repo("org/seed", files={"a.json": b"{}"})
    calls = (lambda: HfApi(token=token).model_info("org/seed"),
             lambda: HfApi(token=token).create_repo("org/x"),
             lambda: snapshot_download("org/seed", token=token),
             lambda: hf_hub_download("org/seed", "a.json", token=token))
    for call in calls:
        with pytest.raises(HfHubHTTPError) as e:
            call()
        assert status_of(e.value) == 401
        assert_no_token(e.value)
    assert "org/x" not in fake_hub.repos


def test_failed_commit_leaves_repo_unchanged(fake_hub, adapter_folder):
    fake_hub.add_repo("org/ad", files={"adapter_config.json": b"{}"})
    before = dict(fake_hub.repos["org/ad"].branches["main"])
    nb_commits = len(fake_hub.repos["org/ad"].commits)
    fake_hub.fail("commit", status=500)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi().upload_folder(folder_path=str(adapter_folder), repo_id="org/ad", allow_patterns=ADAPTER_FILES)
    assert status_of(e.value) == 500 and "injected failure" in str(e.value)
    assert_no_token(e.value)
    assert fake_hub.repos["org/ad"].branches["main"] == before and len(fake_hub.repos["org/ad"].commits) == nb_commits

    # A malformed commit (a bad op after a good one) is refused as a whole.
    lines = [{"key": "header", "value": {"summary": "bad"}},
             {"key": "file", "value": {"path": "x.json", "content": "e30=", "encoding": "base64"}},
             {"key": "lfsFile", "value": {"path": "y.bin", "algo": "sha256", "oid": "0" * 64, "size": 1}}]
    request = urllib.request.Request(f"{fake_hub.url}/api/models/org/ad/commit/main", method="POST",
                                     data=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
                                     headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400
    assert fake_hub.repos["org/ad"].branches["main"] == before

    HfApi().upload_folder(folder_path=str(adapter_folder), repo_id="org/ad", allow_patterns=ADAPTER_FILES)
    assert fake_hub.repos["org/ad"].branches["main"] == local_files(adapter_folder)


def test_injected_failures_of_other_kinds(fake_hub):
    fake_hub.add_repo("org/seed", files={"a.json": b"{}"})
    fake_hub.fail("info", status=503)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi().model_info("org/seed")
    assert status_of(e.value) == 503
    fake_hub.fail("create", status=403)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi().create_repo("org/new")
    assert status_of(e.value) == 403 and "org/new" not in fake_hub.repos
    with pytest.raises(ValueError):
        fake_hub.fail("nonsense")
    assert HfApi().model_info("org/seed").sha == fake_hub.repos["org/seed"].heads["main"]  # failures are used up


def test_delete_repo(fake_hub):
    api = HfApi()
    api.create_repo("org/gone")
    api.delete_repo("org/gone")
    assert "org/gone" not in fake_hub.repos
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("org/gone")
    api.delete_repo("org/gone", missing_ok=True)


def test_module_level_functions_and_no_auth_mode(fake_hub, tmp_path):
    import huggingface_hub

    huggingface_hub.create_repo("org/mod")  # the module-level HfApi, whose endpoint was read at import
    assert "org/mod" in fake_hub.repos
    with FakeHub() as open_hub:  # token=None: no auth check; an explicit endpoint works without any patching
        open_hub.add_repo("org/open", files={"a.json": b"[]"})
        api = HfApi(endpoint=open_hub.url, token=False)
        assert api.model_info("org/open").siblings[0].rfilename == "a.json"
        path = hf_hub_download("org/open", "a.json", endpoint=open_hub.url, token=False, cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == b"[]"


def test_xet_pipeline_also_stays_plain_http(fake_hub, adapter_folder, monkeypatch):
    """With hf_xet enabled, upload_folder takes 2.4's pipelined path; regular files still go inline in one commit."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    HfApi().create_repo("org/pipe")
    HfApi().upload_folder(folder_path=str(adapter_folder), repo_id="org/pipe", allow_patterns=ADAPTER_FILES)
    assert fake_hub.repos["org/pipe"].branches["main"] == local_files(adapter_folder)
    assert transfer_requests(fake_hub) == []


SUBPROCESS_CODE = """
import sys
from huggingface_hub import HfApi, snapshot_download
api = HfApi()
api.create_repo("org/sub", exist_ok=True)
api.upload_folder(folder_path=sys.argv[1], repo_id="org/sub", commit_message="from a subprocess",
                  allow_patterns=["adapter_config.json", "adapter_model.safetensors"])
folder = snapshot_download("org/sub", allow_patterns=["*.json"])
print(open(folder + "/adapter_config.json").read())
"""


def test_subprocess_reaches_the_hub_through_env(fake_hub, adapter_folder, tmp_path):
    env = {**os.environ, **fake_hub.env(tmp_path / "sub_home")}
    done = subprocess.run([sys.executable, "-c", SUBPROCESS_CODE, str(adapter_folder)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads((adapter_folder / "adapter_config.json").read_text())
    repo = fake_hub.repos["org/sub"]
    assert repo.commits[-1]["message"] == "from a subprocess"
    assert repo.branches["main"] == local_files(adapter_folder, ["adapter_config.json", "adapter_model.safetensors"])
    assert all(h.get("authorization") == f"Bearer {TEST_TOKEN}" for _, _, h in fake_hub.requests)
