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
from ..run_directory import CARD_NAME, PLOTS_DIR, REPORT_NAME, WEIGHTS_NAME, RunDirectory, children_of

logger = logging.getLogger(__name__)

#: Files never uploaded from final/: pickles (the Trainer's training_args.bin, optimizer states).
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pkl", ".pickle")


def _stage(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` without copying where a hard link is possible."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _own_file(run: RunDirectory, path: Path) -> Path:
    """``path`` when it is a regular file inside the run directory, not a symbolic link and not
    reached through one; raises otherwise (a link planted in a downloaded run would upload its
    target, a Hub token file for one)."""
    root = run.root.resolve()
    if path.is_symlink():
        raise PushError(f"{path} is a symbolic link (to {os.readlink(path)}): push uploads only the regular files "
                        "hf_stability wrote inside the run directory. Remove the link and push again.")
    if not path.is_file():
        raise PushError(f"{path} is not a regular file: remove it, run `hf-stability report {run.root}` and push "
                        "again.")
    if not path.resolve().is_relative_to(root):
        raise PushError(f"{path} lies outside {root} once links are followed (a linked folder on its way): push "
                        "uploads only files inside the run directory. Replace the link with a real folder.")
    return path


def _staged_files(run: RunDirectory, include_weights: bool) -> list[tuple[Path, str]]:
    """What is uploaded, and where in the repository: the card, report.json, the report's figures
    and (if asked) the parent's final/ at the root and every child's weights under
    children/t<t>/c<k>/, each checked by ``_own_file``. Files of other names are never uploaded."""
    from .plots import PLOTS

    files = [(run.card_file, CARD_NAME), (run.report_file, REPORT_NAME)]
    files += [(run.plots_dir / name, f"{PLOTS_DIR}/{name}") for name in PLOTS
              if (run.plots_dir / name).exists() or (run.plots_dir / name).is_symlink()]
    if include_weights:
        files += [(f, f.name) for f in sorted(run.parent_final.iterdir())
                  if (f.is_file() or f.is_symlink()) and f.suffix not in PICKLE_SUFFIXES and f.name != CARD_NAME]
        config = run.load_config()
        for t in config["spawn_steps"]:
            for k in children_of(config, t):
                weights = run.child_final(t, k) / WEIGHTS_NAME
                if weights.exists() or weights.is_symlink():
                    files.append((weights, f"{run.child_dir(t, k).relative_to(run.root).as_posix()}/{WEIGHTS_NAME}"))
    return [(_own_file(run, source), name) for source, name in files]


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
    commit URL. The run's files are only read; its lock is held meanwhile (so nothing changes
    them during the upload), which notes the pushing process in the lock file.

    Raises:
        PushError: invalid repo id, no token, nothing rendered, a file that is no regular file of
            the run (a symbolic link), or the Hub refused.
        RunInUseError: another process is writing the run directory.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..run_lock import locked_run

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"Invalid repo id {repo_id!r}: {err}. Use 'name' or 'namespace/name'.") from None
    run = RunDirectory(run_dir)
    if not run.root.is_dir():
        raise PushError(f"{run.root} is not a directory: pass the run directory of a butterfly study.")
    with locked_run(run.root, "push"):
        return _push(run, repo_id, private=private, include_weights=include_weights,
                     commit_message=commit_message, endpoint=endpoint)


def _push(run: RunDirectory, repo_id: str, *, private: bool, include_weights: bool, commit_message: str | None,
          endpoint: str | None) -> str:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    run.remove_temporaries()  # a killed push's staging folder
    if not run.card_file.is_file():
        raise PushError(f"{run.root} has no rendered report: run `hf-stability report {run.root}` first.")
    if include_weights and not (run.parent_final / WEIGHTS_NAME).is_file():
        raise PushError(f"{run.parent_final} holds no model.safetensors to upload: the parent has not finished.")
    token = get_token()  # HF_TOKEN, else the huggingface_hub login
    if not token:
        raise PushError("No Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again.")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or ("Upload hf_stability report" + (" and final weights" if include_weights else ""))
    files = _staged_files(run, include_weights)  # refused links stop the push before anything is sent
    with tempfile.TemporaryDirectory(prefix=".push-", suffix=".tmp", dir=run.root) as staging:
        for source, name in files:
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
            raise PushError(f"Uploading to {repo_id} failed (HTTP {status}): {advice}. Nothing local was changed.",
                            status=status) from None
    logger.info("Pushed %s to %s", run.root, commit.commit_url if hasattr(commit, "commit_url") else commit)
    return str(getattr(commit, "commit_url", commit))
