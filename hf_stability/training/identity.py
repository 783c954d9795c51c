"""Run identity: what stability_config.json records of a study, and the fingerprint of what
fixes its weights.

The fingerprint covers the stability and training arguments, the model's configuration, the
training data and the number of steps, but not where or how often things are logged or saved:
a study run again with the same identity resumes; another identity in the same output_dir is
refused (with the differing keys) unless overwrite_run.
"""

from __future__ import annotations

import json
import platform
from typing import Any

import torch

from ..run_directory import FORMAT_VERSION, fingerprint
from .determinism import hardware_record
from .stacked_attention import PER_CHILD

#: TrainingArguments that change where or how things are written, never the weights.
NON_IDENTITY_TRAINING_ARGUMENTS = {
    "output_dir", "logging_dir", "run_name", "report_to", "disable_tqdm", "logging_steps", "logging_strategy",
    "logging_first_step", "logging_nan_inf_filter", "save_steps", "save_strategy", "save_total_limit",
    "save_only_model", "save_safetensors", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
    "hub_private_repo", "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "eval_steps", "eval_strategy",
    "per_device_eval_batch_size", "eval_accumulation_steps", "eval_delay", "eval_on_start", "overwrite_output_dir",
    "resume_from_checkpoint", "skip_memory_metrics", "include_num_input_tokens_seen", "project", "trackio_space_id",
    "log_level", "log_level_replica", "log_on_each_node", "do_train", "do_eval", "do_predict",
}
#: StabilityArguments that change what is kept, logged or how children are batched, never the weights.
NON_IDENTITY_STABILITY_ARGUMENTS = {
    "overwrite_run", "keep_parent_trajectory", "keep_child_checkpoints", "divergence_every",
    "analysis_train_samples", "analysis_eval_samples", "base_model", "dataset_name", "parallel_children",
    "stacked_cuda_graphs",
}
#: Model config keys that say where the model came from, or that training and saving fill in (a
#: second butterfly() on the same model must find the same configuration).
VOLATILE_CONFIG_KEYS = (
    "_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "problem_type",
    "use_cache",
)


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import transformers

    from .. import __version__

    return {
        "hf_stability": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def run_config(trainer: Any, max_steps: int) -> dict[str, Any]:
    """The content of stability_config.json for the study on ``trainer``."""
    stability = trainer.stability_args
    training = trainer.args.to_dict()
    model = trainer.model
    model_info: dict[str, Any] = {"class": type(model).__name__}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        config_dict = model_config.to_dict()
        for key in VOLATILE_CONFIG_KEYS:
            config_dict.pop(key, None)
        model_info["config"] = config_dict
    dataset = trainer.train_dataset
    data_info = {
        "class": type(dataset).__name__,
        "length": len(dataset) if hasattr(dataset, "__len__") else None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
    }
    identity = {
        "format_version": FORMAT_VERSION,
        "stability_arguments": {k: v for k, v in stability.to_dict().items()
                                if k not in NON_IDENTITY_STABILITY_ARGUMENTS},
        "training_arguments": {k: v for k, v in training.items() if k not in NON_IDENTITY_TRAINING_ARGUMENTS},
        "model": model_info,
        "train_dataset": data_info,
        "max_steps": max_steps,
    }
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it will be read back
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(identity),
        "max_steps": max_steps,
        **stability.plan(),
        "seeds": {"seed": trainer.args.seed, "data_seed": trainer.args.data_seed,
                  "perturbation_seed": stability.perturbation_seed},
        "stability_arguments": stability.to_dict(),
        "training_arguments": training,
        "versions": library_versions(),
        "hardware": hardware_record(trainer.args.device),
        # made for stacked children: every model trains with their dropout (SameMaskDropout)
        "stacked_numerics": stability.children_at_once > 1,
        "stacked_attention": PER_CHILD,  # stacked children's attention runs child by child (stacked_attention.py)
        "identity": identity,
    }
