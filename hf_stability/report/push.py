"""Upload a run's report (and, if asked, its final weights) to a Hub model repository.

The repository gets README.md (the card), report.json and plots/; with weights, the parent's
final model at the root (so ``from_pretrained(repo_id)`` loads the parent) and every child's
``model.safetensors`` under ``children/t<t>/c<k>/``. The token comes from HF_TOKEN or the
huggingface_hub login; it is handed to huggingface_hub and never written or logged here.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import PushError
from ..run_directory import RunDirectory

logger = logging.getLogger(__name__)


def _stage(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` without copying where a hard link is possible."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _staged_files(run: RunDirectory, include_weights: bool) -> list[tuple[Path, str]]:
    analysis = run.analysis_dir
    files = [(analysis / "README.md", "README.md"), (analysis / "report.json", "report.json")]
    files += [(png, f"plots/{png.name}") for png in sorted((analysis / "plots").glob("*.png"))]
    if include_weights:
        files += [(f, f.name) for f in sorted(run.parent_final.iterdir())
                  if f.is_file() and f.suffix != ".pth" and f.name != "README.md"]
        for weights in sorted(run.root.glob("children/t*/c*/final/model.safetensors")):
            child = weights.parent.parent
            files.append((weights, f"children/{child.parent.name}/{child.name}/model.safetensors"))
    return files


def push_report(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    include_weights: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (exist_ok) and upload the report in one commit; returns the
    commit URL. The local run directory is only read."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"Invalid repo id {repo_id!r}: {err}. Use 'name' or 'namespace/name'.") from None
    run = RunDirectory(run_dir)
    card = run.analysis_dir / "README.md"
    if not card.is_file():
        raise PushError(f"{run.root} has no rendered report: run `hf-stability report {run.root}` first.")
    if include_weights and not (run.parent_final / "model.safetensors").is_file():
        raise PushError(f"{run.parent_final} holds no model.safetensors to upload: the parent has not finished.")
    token = get_token()  # HF_TOKEN, else the huggingface_hub login
    if not token:
        raise PushError("No Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again.")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or ("Upload hf_stability report" + (" and final weights" if include_weights else ""))
    with tempfile.TemporaryDirectory(prefix=".hf-stability-push-", dir=run.root) as staging:
        for source, name in _staged_files(run, include_weights):
            _stage(source, Path(staging) / name)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=message,
                                       repo_type="model")
        except HfHubHTTPError as err:
            status = getattr(err.response, "status_code", None)
            if status in (401, 403):
                advice = "the token was refused: check HF_TOKEN (or `hf auth login`) and its write access to " + repo_id
            elif status is not None and status >= 500:
                advice = "the Hub failed on its side: try again later"
            else:
                advice = "the Hub answered: " + (str(err).splitlines() or [""])[0][:300]
            raise PushError(f"Uploading to {repo_id} failed (HTTP {status}): {advice}. Nothing local was changed.") from None
    logger.info("Pushed %s to %s", run.root, commit.commit_url if hasattr(commit, "commit_url") else commit)
    return str(getattr(commit, "commit_url", commit))
