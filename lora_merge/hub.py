"""The Hugging Face Hub in and out: download adapter files of `org/name[@revision]`, push a saved adapter.

Both go through `huggingface_hub`, so HF_TOKEN, HF_HOME and the cache work as everywhere else. HF_ENDPOINT and
HF_HUB_OFFLINE are read at call time (huggingface_hub reads them once, at import). Errors become one `HubError`
line that never holds the token.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import __version__
from .errors import AdapterLoadError, HubError

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")     # the shape of a Hugging Face access token


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _scrub(text: str, token: str | None = None) -> str:
    """`text` without the token, nor anything that looks like one."""
    if token is None:
        from huggingface_hub import get_token
        token = get_token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _describe(e: Exception, what: str, token: str | None) -> str:
    """One line for a huggingface_hub (or network) failure."""
    from huggingface_hub import errors as hf

    if isinstance(e, hf.RevisionNotFoundError):
        why = "no such revision (branch, tag or commit) in this repo"
    elif isinstance(e, hf.GatedRepoError):
        why = "the repo is gated; accept its terms on the Hub and set HF_TOKEN"
    elif isinstance(e, hf.RepositoryNotFoundError):
        why = "no such repo on the Hub (or it is private: set HF_TOKEN to a token that can read it)"
    elif isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):   # before EntryNotFound: a subclass
        why = ("not in the local cache, and the Hub cannot be reached"
               + (" (HF_HUB_OFFLINE is set)" if _offline() else ""))
    elif isinstance(e, (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError)):
        why = "a file is missing from the repo"
    elif isinstance(e, hf.HfHubHTTPError):
        status = getattr(e.response, "status_code", None) if getattr(e, "response", None) is not None else None
        server = (getattr(e, "server_message", None) or "").strip().splitlines()
        why = f"the Hub answered HTTP {status}" + (f": {server[0]}" if server else "")
        if status in (401, 403):
            why += " (check that HF_TOKEN is set to a token with the needed access)"
    else:
        first = str(e).strip().splitlines()
        why = f"{type(e).__name__}" + (f": {first[0]}" if first else "")
    return _scrub(f"{what}: {why}", token)


def check_repo_id(repo_id: str) -> None:
    """A clear error for an invalid repo id, before any work is done."""
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except Exception as e:  # noqa: BLE001 - HFValidationError; one line
        raise HubError(f"{repo_id!r} is not a valid Hub repo id ({str(e).splitlines()[0]})", key="repo_id") from None
    if "/" not in repo_id:
        raise HubError(f"{repo_id!r}: give the repo as namespace/name (your user or organisation, then the name)",
                       key="repo_id")


def download(repo_id: str, revision: str | None = None, *, allow_pickle: bool = False,
             token: str | None = None) -> Path:
    """A local snapshot of the adapter files of Hub repo `repo_id` at `revision`; the rest is not fetched."""
    from huggingface_hub import snapshot_download

    patterns = ADAPTER_FILES + (["adapter_model.bin"] if allow_pickle else [])
    what = repo_id + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token,
                                   endpoint=_endpoint(), local_files_only=_offline(),
                                   library_name="lora-merge", library_version=__version__)
    except Exception as e:  # noqa: BLE001 - huggingface_hub and its HTTP client raise many kinds; one line each
        raise HubError(_describe(e, what, token), file=what) from None
    folder = Path(folder)
    weights = [f for f in patterns if f.startswith("adapter_model") and (folder / f).is_file()]
    missing = [f for f in ("adapter_config.json",) if not (folder / f).is_file()] + ([] if weights else [
        "adapter_model.safetensors" + (" (nor adapter_model.bin)" if allow_pickle else "")])
    if missing:
        hint = "" if allow_pickle else " (a pickled adapter_model.bin is fetched only with allow_pickle=True)"
        raise AdapterLoadError(f"{what}: the repo is not a PEFT LoRA adapter: it has no "
                               f"{' and no '.join(missing)}{hint}", file=what)
    return folder


def push(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a saved adapter folder to Hub repo `repo_id` in one commit; returns the commit's URL.

    Only the adapter files and the model card (README.md) are uploaded. The repo is created if needed, and
    `revision` (a branch) too. If the commit fails on a repo this call created, the empty repo is deleted, so
    a failure leaves the Hub as it was.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf

    from .io import load

    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():                        # a local folder only: never read `folder` as a Hub id
        raise AdapterLoadError(f"{folder}: no such adapter folder", file=str(folder))
    adapter = load(folder)                         # refuse to publish anything that is not a valid adapter
    api = HfApi(endpoint=_endpoint(), token=token, library_name="lora-merge", library_version=__version__)
    created = False
    try:
        try:
            api.create_repo(repo_id, private=private, exist_ok=False)
            created = True                         # only a repo this call made is deleted on failure
        except hf.HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) != 409:
                raise
            if private and not api.repo_info(repo_id).private:
                raise HubError(f"push to {repo_id}: the repo exists and is public; --private (private=True) does "
                               "not change an existing repo's visibility: change it on the Hub, or push without it",
                               file=str(folder), key="private") from None
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message or f"Upload {adapter.name} made with lora-merge",
                                 allow_patterns=ADAPTER_FILES)
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - as in download
        message = _describe(e, f"push to {repo_id}" + (f"@{revision}" if revision else ""), token)
        if created:
            try:
                api.delete_repo(repo_id, missing_ok=True)
                message += "; the repo this push had created was deleted again"
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                message += f"; the repo {repo_id} this push created may remain, empty"
        raise HubError(message, file=str(folder)) from None
    return str(getattr(info, "commit_url", None) or info)


__all__ = ["download", "push", "check_repo_id"]
