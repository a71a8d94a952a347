"""Pushing an export folder to the Hugging Face Hub: one create_repo and one upload_folder call."""

from __future__ import annotations

import os

from stages.common.errors import StorageError


def listing(folder: str) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file that upload_folder would send."""
    out = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            out.append((os.path.relpath(path, folder), os.path.getsize(path)))
    return sorted(out)


def describe_dry_run(folder: str, repo_id: str, private: bool, commit_message: str, has_token: bool) -> str:
    files = listing(folder)
    lines = [f"dry run: would push to https://huggingface.co/{repo_id} "
             f"({'private' if private else 'public'} if created), commit message {commit_message!r}"]
    lines += [f"  {path}  {size} bytes" for path, size in files]
    lines.append(f"  {len(files)} files, {sum(s for _, s in files)} bytes; HF_TOKEN is "
                 f"{'set' if has_token else 'NOT set (a real push needs it)'}")
    return "\n".join(lines)


def push(folder: str, repo_id: str, token: str, private: bool, commit_message: str) -> str:
    """Create the repo if needed, upload the folder in one commit; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo = create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        commit = upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
                               token=token, repo_type="model")
    except Exception as exc:  # noqa: BLE001 - any Hub/network failure is reported the same way
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise StorageError(f"pushing to Hub repo {repo_id} at {endpoint} failed: {type(exc).__name__}: "
                           f"{exc} (check HF_TOKEN has write access and the Hub is reachable)") from exc
    return commit.commit_url
