"""`lora-merge push FOLDER REPO_ID`: publish a saved adapter to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import Json, Private, Quiet, command, emit_json, hub_progress


@command
def push(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="A saved adapter folder (e.g. the -o of merge).",
                                           show_default=False)],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repo, namespace/name.", show_default=False)],
    private: Private = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created if needed).")
                        ] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="The commit's message.")] = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Upload an adapter folder (adapter files and model card) to a Hub repo in one commit.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.

    \b
    Examples:
      lora-merge push out/merged me/merged-lora --private
      lora-merge push out/merged me/merged-lora --revision experiment-2 --commit-message "TIES, density 0.5"
    """
    from ..hub import push as push_folder

    hub_progress(quiet)
    url = push_folder(folder, repo_id, private=private or None, revision=revision, commit_message=commit_message)
    if as_json:
        emit_json({"folder": str(folder), "repo_id": repo_id, "revision": revision or "main", "commit_url": url})
    else:
        typer.echo(f"pushed {folder} to {repo_id}{'@' + revision if revision else ''}: {url}")
