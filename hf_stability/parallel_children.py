"""Parallel children: K children of one spawn step trained together as one stacked model.

``StackedModel`` holds every parameter of the architecture as one tensor of shape
``[K, *shape]`` in the original module tree, and runs the K children with
``torch.func.vmap(functional_call)``. Its loss is the sum of the children's losses, so each
child's slice of the gradient is exactly its own gradient; AdamW is elementwise, so one AdamW
over the stacked tensors is K independent AdamWs. Everything else is the Trainer's own loop:
the same batches, learning-rate schedule, gradient accumulation, mixed precision and logging.
Dropout masks come from ``randomness="same"``, which draws each mask once, as one child alone
would; ``SameMaskDropout`` makes the parent and children trained alone draw theirs the same way.

What a stacked model cannot do the same way is handled here: gradient clipping per child
(``clip_per_child``, called by StabilityTrainer in place of the Trainer's clipping),
divergence per child (``ChildDivergenceCallback``) and NaN detection per child
(``ChildLossCallback``).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .divergence import LOG_KEY, DivergenceCallback, DivergenceLog, squared_distance_to_file

logger = logging.getLogger(__name__)

PREFIX = "template."
ELEMENTWISE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


class StackedModel(nn.Module):
    """K models of one architecture as one module with stacked parameters (see module docstring)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        if len(models) < 1:
            raise ValueError("StackedModel needs at least one model.")
        self.num_children = len(models)
        self.template = copy.deepcopy(models[0])
        names = [n for n, _ in self.template.named_parameters()]
        with torch.no_grad():
            for name in names:
                module_name, _, attr = name.rpartition(".")
                module = self.template.get_submodule(module_name) if module_name else self.template
                stacked = torch.stack([m.get_parameter(name).detach() for m in models])
                setattr(module, attr, nn.Parameter(stacked.clone(), requires_grad=True))
        self.config = getattr(self.template, "config", None)
        self.last_losses: torch.Tensor | None = None

    def child_parameters(self, k: int) -> dict[str, torch.Tensor]:
        """Child k's parameters (views into the stacked tensors), by the original names."""
        return {n: p[k] for n, p in self.template.named_parameters()}

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        if self.training and self.template.training and next(self.parameters()).is_cuda:
            use_eager_attention(self.template)
        params = dict(self.template.named_parameters())
        buffers = dict(self.template.named_buffers())

        def one_child(child_params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(self.template, (child_params, buffers), args=(), kwargs=inputs)
            return out["loss"], out["logits"]

        losses, logits = vmap(one_child, randomness="same")(params)
        self.last_losses = losses.detach()
        # Sum: child k's slice of the gradient is d loss_k / d theta_k. A NaN child stays in its slice.
        return {"loss": losses.sum(), "logits": logits}


class SameMaskDropout(TorchFunctionMode):
    """Dropout as vmap's ``randomness="same"`` rule computes it: ``mask = empty_like(x).bernoulli_(1 - p)``,
    ``x * mask * (1 / (1 - p))``.

    On CPU this is also what ``F.dropout`` computes. On CUDA ``F.dropout`` runs a fused kernel that
    draws other masks from the same RNG state, so a parent trained with it and its control child
    trained stacked would see different masks at every step (measured on an H100: L2 1.8 after
    200 steps). StabilityTrainer therefore trains every model of a run created with
    parallel_children > 1 under this mode (``stacked_numerics`` in stability_config.json).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.dropout:
            return func(*args, **kwargs)
        names = ("input", "p", "training", "inplace")
        bound = {**dict(zip(names, args)), **kwargs}
        x, p = bound["input"], float(bound.get("p", 0.5))
        if not bound.get("training", True) or p == 0.0:
            return x
        keep = 1.0 - p
        scale = 0.0 if keep == 0.0 else 1.0 / keep
        mask = torch.empty_like(x).bernoulli_(keep)
        if bound.get("inplace", False):
            return x.mul_(mask).mul_(scale)
        return x.mul(mask).mul_(scale)


def use_eager_attention(model: nn.Module) -> None:
    """Switch ``model`` to eager attention, in transformers' modules and in timm's (``fused_attn``).

    On CUDA, fused scaled-dot-product attention draws its dropout inside the kernel, which vmap
    cannot share across children, and its backward fails under vmap for timm's layout (H100,
    torch 2.11: "LSE is not correctly aligned (strideH)"). Stacked children therefore use the
    eager attention there, and so must the parent and any child trained alone in the same run:
    with another attention the dropout masks and the rounding differ, and the control child
    would not follow its parent (measured on an H100: L2 1.8 instead of 1e-4 after 200 steps).
    """
    for module in model.modules():
        if getattr(module, "fused_attn", False) is True:
            module.fused_attn = False
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in (None, "eager"):
        logger.info("Using eager attention: stacked children on CUDA need it, and so does their parent.")
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"


def unstack_into(stacked: StackedModel, k: int, model: nn.Module) -> nn.Module:
    """Copy child k's parameters into ``model`` (an unstacked model of the same architecture)."""
    with torch.no_grad():
        for name, tensor in stacked.child_parameters(k).items():
            model.get_parameter(name).copy_(tensor)
    return model


def stacked_optimizer_state(path: Path, num_children: int) -> dict[str, Any]:
    """The optimizer state of a spawn checkpoint with every per-parameter tensor repeated for the
    K children (scalars such as Adam's step stay shared)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        from .errors import RunDirectoryError

        raise RunDirectoryError(
            f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}): the spawn checkpoint is damaged. "
            "Restore it from a copy of the run, or train the parent again with --overwrite_run."
        ) from None
    for per_param in state["state"].values():
        for key, value in list(per_param.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                per_param[key] = torch.stack([value] * num_children)
    return state


def estimate_bytes(model: nn.Module, num_children: int, args: TrainingArguments, seq_len: int | None) -> int:
    """A rough peak-memory estimate of K stacked children: weights, gradients and two AdamW
    moments in float32, plus activations of one batch per child (an upper-bound guess of 40
    floats per hidden unit, token and layer; ``seq_len`` None: the model's longest input). On an
    H100, MiniLM with batch 32 x 128 tokens estimated 15 GiB for K = 8 and used 11.7 GiB."""
    numel = sum(p.numel() for p in model.parameters())
    state = numel * 4 * 4
    hidden, layers, tokens_per_example = _activation_shape(model)
    tokens = args.per_device_train_batch_size * (seq_len or tokens_per_example)
    activations = 40 * hidden * tokens * layers * (2 if args.bf16 or args.fp16 else 4)
    return num_children * (state + activations)


def _activation_shape(model: nn.Module) -> tuple[int, int, int]:
    """(width, blocks, tokens per example) of a transformer: a timm ViT inside TimmWrapper, a
    transformers ViT (patches + CLS) or a text model (its longest input)."""
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "blocks"):
        patches = getattr(getattr(timm_model, "patch_embed", None), "num_patches", 196)
        return (int(getattr(timm_model, "embed_dim", 768)), len(timm_model.blocks),
                int(patches) + int(getattr(timm_model, "num_prefix_tokens", 1)))
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 768)
    layers = getattr(config, "num_hidden_layers", 12)
    if getattr(config, "image_size", None) and getattr(config, "patch_size", None):
        return hidden, layers, (config.image_size // config.patch_size) ** 2 + 1
    return hidden, layers, getattr(config, "max_position_embeddings", 512)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def clip_per_child(model: StackedModel, max_norm: float | None) -> float:
    """Each child's gradient norm, and (with ``max_norm`` > 0) clipping of each child on its own,
    as torch's clip_grad_norm_ does for one model. Returns the mean norm over the children whose
    norm is finite (what the Trainer logs as grad_norm); a NaN child never touches the others."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    k = grads[0].shape[0]
    norms = torch.stack([g.reshape(k, -1).float().norm(dim=1) for g in grads]).norm(dim=0)
    if max_norm is not None and max_norm > 0:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    finite = norms[torch.isfinite(norms)]
    return float(finite.mean()) if finite.numel() else float("nan")


class StackedDivergenceCallback(DivergenceCallback):
    """Divergence of every child of a stacked run: at each divergence step the parent's file is
    read once and compared with all K children on their device. Logged as
    ``divergence/l2_to_parent/c<k>`` and written to the files of ``output_files`` (child -> its
    divergence.jsonl; a child already finished by an earlier, killed run has none). A NaN or Inf
    distance marks that child in ``diverged`` instead of stopping its siblings."""

    def __init__(self, children: list[int], diverged: dict[int, dict[str, Any]], output_files: dict[int, Path],
                 **kwargs: Any):
        super().__init__(output_file=next(iter(output_files.values())), **kwargs)
        self.children, self.diverged = children, diverged
        self.logs = {child: DivergenceLog(path, self.spawn_step) for child, path in output_files.items()}

    def _record(self, state: TrainerState, model: nn.Module) -> list[float]:
        params = {n: p for n, p in model.template.named_parameters() if p.is_floating_point()}
        values = squared_distance_to_file(params, self.path_for(state.global_step), stacked=True).sqrt().tolist()
        for child, l2 in zip(self.children, values):
            if child in self.diverged:
                continue
            if state.is_world_process_zero and child in self.logs:
                self.logs[child].append(state.global_step, l2)
            if not math.isfinite(l2):
                self.diverged[child] = {"step": state.global_step, "reason": f"L2 distance to the parent is {l2}"}
        return values

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            for log in self.logs.values():
                log.start(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.measured_at(state.global_step):
            for child, l2 in zip(self.children, self._record(state, kwargs["model"])):
                if child not in self.diverged or self.diverged[child]["step"] == state.global_step:
                    self.pending_logs[f"{LOG_KEY}/c{child}"] = l2
            control.should_log = True


class ChildLossCallback(TrainerCallback):
    """Marks a child diverged at the first step whose training loss is NaN or Inf."""

    def __init__(self, children: list[int], diverged: dict[int, dict[str, Any]]):
        self.children, self.diverged = children, diverged

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        losses = kwargs["model"].last_losses
        if losses is None:
            return
        for child, value in zip(self.children, losses.tolist()):
            if not math.isfinite(value) and child not in self.diverged:
                self.diverged[child] = {"step": state.global_step, "reason": f"training loss is {value}"}
                logger.warning("Child %d diverged at step %d (loss %s); its siblings go on.", child,
                               state.global_step, value)
