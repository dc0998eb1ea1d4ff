"""Pushing folders (adapters, merged models, datasets) to the Hugging Face Hub."""

from __future__ import annotations

import os

from align.errors import AlignError


def push_folder(folder: str, repo_id: str, repo_type: str = "model", private: bool = True) -> str:
    """Create `repo_id` (private by default) and upload `folder`; the token comes from HF_TOKEN / the login."""
    from huggingface_hub import HfApi

    if "/" not in repo_id:
        raise AlignError(f"--push-to-hub/--repo-id: {repo_id!r} should look like ORG/NAME")
    api = HfApi(token=os.environ.get("HF_TOKEN"))
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type)
    except Exception as err:  # network, auth: the user needs the reason, not a traceback
        raise AlignError(f"push to {repo_id} failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
