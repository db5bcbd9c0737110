"""Publishing a converted DreamLLM folder on the Hugging Face Hub, in one commit.

The token comes from the usual places (`HF_TOKEN`, the `hf auth login` cache), the endpoint from `HF_ENDPOINT`.
`create_commit` is used rather than the streamed multi-commit `upload_folder`: the whole checkpoint lands in a single
commit, so nobody can download a half-uploaded model; large files go through Xet/LFS as huggingface_hub decides.
"""

import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id


logger = logging.getLogger(__name__)

REQUIRED_FILES = (
    "model_index.json",
    "mllm/config.json",
    "processor/processor_config.json",
    "unet/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)


class HubPushError(RuntimeError):
    """Nothing was uploaded: the folder, the token or the settings are not fit for a push."""


def check_can_push(
    repo_id: str, token: str | None = None, endpoint: str | None = None, check_token: bool = True
) -> None:
    """Fails early (before any long conversion) when a push could not work: bad repo id, offline mode, no token."""
    try:
        validate_repo_id(repo_id)
    except Exception as error:  # HFValidationError
        raise HubPushError(f"{repo_id!r} is not a valid repository id (expected USER/REPO): {error}") from error
    if constants.is_offline_mode():
        raise HubPushError("HF_HUB_OFFLINE is set: the Hub cannot be reached. Unset it to push.")
    if token is None and get_token() is None:
        raise HubPushError("No Hugging Face token found: run `hf auth login` or set HF_TOKEN (with write access).")
    if check_token:
        try:
            HfApi(endpoint=endpoint, token=token).whoami()
        except Exception as error:
            raise HubPushError(
                f"The Hugging Face token was refused by {endpoint or constants.ENDPOINT}: {error}"
            ) from error


def converted_files(folder: Path) -> list[Path]:
    """The files of a converted folder that are uploaded (hidden files and folders are not)."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise HubPushError(
            f"{folder} is not a converted DreamLLM folder (missing {', '.join(missing)}); "
            "run `dreamllm-hf convert` first."
        )
    if not any((folder / "mllm").glob("*.safetensors")):
        raise HubPushError(f"{folder / 'mllm'} holds no safetensors weights.")
    report = folder / "conversion.json"
    if report.is_file():
        verification = json.loads(report.read_text()).get("verification")
        if verification is not None and not verification.get("passed", False):
            raise HubPushError(f"{report} records a failed verification; not uploading.")
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(path)
    return files


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    update_card: bool = True,
    card_template: str | os.PathLike | None = None,
    card_fields: dict | None = None,
):
    """Uploads a converted folder to `repo_id` (created if needed) in one commit; returns the `CommitInfo`.

    Args:
        revision: a branch; created from the default branch if it does not exist.
        update_card: render README.md again for `repo_id` from `conversion.json` (so the snippets name the repo);
            False uploads the folder's README.md as it is. The folder itself is never modified.
        card_template: as in `dreamllm_hf.model_card.build_model_card`.
        card_fields: as in `dreamllm_hf.model_card.build_model_card`.
    """
    folder = Path(folder)
    files = converted_files(folder)
    check_can_push(repo_id, token=token, endpoint=endpoint, check_token=False)
    readme = None
    if update_card and (folder / "conversion.json").is_file():
        from ..model_card import ConvertedFolder, build_model_card, model_facts

        info = json.loads((folder / "conversion.json").read_text())
        # The card states what the folder's configs say (a folder converted by an older version lacks some facts).
        info["config"] = {**info.get("config", {}), **model_facts(folder)}
        card = build_model_card(ConvertedFolder(info, repo_id=repo_id), template=card_template, fields=card_fields)
        readme = str(card).encode("utf-8")

    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = repo_url.repo_id or repo_id
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    except HfHubHTTPError as error:
        raise HubPushError(f"Could not prepare {repo_id} on the Hub: {error}") from error

    operations = []
    for path in files:
        path_in_repo = path.relative_to(folder).as_posix()
        if path_in_repo == "README.md" and readme is not None:
            continue
        operations.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path)))
    if readme is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
    if commit_message is None:
        commit_message = "Upload DreamLLM converted with dreamllm_hf"
    size = sum(path.stat().st_size for path in files)
    logger.info("Uploading %d files (%.1f MiB) to %s in one commit", len(operations), size / 2**20, repo_id)
    try:
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            repo_type="model",
        )
    except HfHubHTTPError as error:  # the commit is atomic: nothing of it is visible in the repository
        raise HubPushError(f"The upload to {repo_id} failed; nothing was committed: {error}") from error
