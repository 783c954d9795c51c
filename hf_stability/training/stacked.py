"""Parallel children: K children of one spawn step trained together as one stacked model.

``StackedModel`` holds every parameter of the architecture as one tensor of shape
``[K, *shape]`` in the original module tree, and runs the K children with
``torch.func.vmap(functional_call)``. Its loss is the sum of the children's losses, so each
child's slice of the gradient is exactly its own gradient; AdamW is elementwise, so one AdamW
over the stacked tensors is K independent AdamWs. Everything else is the Trainer's own loop:
the same batches, learning-rate schedule, gradient accumulation, mixed precision and logging.
Dropout masks come from ``randomness="same"``, which draws each mask once, as one child alone
would; ``SameMaskDropout`` makes the parent and children trained alone draw theirs the same way.

Policy and mechanism live here together: what stacked children cannot do as children alone
would is refused before anything trains (``check_parallel_children``), and a group is trained
and written like children alone (``train_stacked_group``). Gradient clipping per child
(``clip_per_child``) is called by StabilityMixin in place of the Trainer's clipping; divergence
and NaN detection per child are callbacks.py's ``StackedDivergenceCallback`` and
``ChildLossCallback``.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import TrainingArguments

from ..atomic_io import write_json
from ..errors import RunDirectoryError, StudySetupError
from ..hints import setting
from ..perturb import PerturbationConfig, PerturbationKind, perturb_model
from ..perturb.rng import global_rng_state, rng_state_key, set_global_rng_state
from ..run_directory import OPTIMIZER_NAME
from .arguments import AUTO
from .stacked_attention import PerChildAttention, use_eager_attention
from .stacked_graphs import StepGraphs

if TYPE_CHECKING:
    from ..run_directory import RunDirectory
    from .study import ButterflyStudy

logger = logging.getLogger(__name__)

PREFIX = "template."
ELEMENTWISE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


class StackedModel(nn.Module):
    """K models of one architecture as one module with stacked parameters (see module docstring)."""

    def __init__(self, models: list[nn.Module], stack_frozen: bool = False, eager_attention: bool = False,
                 cuda_graphs: bool = True):
        """``stack_frozen``: stack the frozen parameters too (children perturbed in them); by
        default they stay one tensor that every child shares (a PEFT model's base: once, not K times).
        ``eager_attention``: a run made before per-child attention (stacked_attention.py), whose
        models all use eager attention on CUDA. ``cuda_graphs``: on CUDA, replay the training
        step as CUDA graphs where it can be captured (stacked_graphs.py)."""
        super().__init__()
        if len(models) < 1:
            raise ValueError("StackedModel needs at least one model.")
        self.num_children = len(models)
        self.template = copy.deepcopy(models[0])
        self.stacked_names = [n for n, p in self.template.named_parameters() if p.requires_grad or stack_frozen]
        with torch.no_grad():
            for name in self.stacked_names:
                module_name, _, attr = name.rpartition(".")
                module = self.template.get_submodule(module_name) if module_name else self.template
                trainable = module.get_parameter(attr).requires_grad
                stacked = torch.stack([m.get_parameter(name).detach() for m in models])
                setattr(module, attr, nn.Parameter(stacked, requires_grad=trainable))  # (stack copies)
        self.config = getattr(self.template, "config", None)
        self.eager_attention = eager_attention
        self.step_graphs = StepGraphs() if cuda_graphs else None
        self.last_losses: torch.Tensor | None = None

    def can_hold(self, models: list[nn.Module]) -> bool:
        """Whether ``models`` fit this stack as it stands: as many of them, the same stacked and
        shared tensors with the same shapes, dtypes and devices (``load`` then reuses it)."""
        if len(models) != self.num_children:
            return False
        def layout(tensors: Any, stacked: set[str]) -> dict[str, tuple]:
            return {n: (x.shape[1:] if n in stacked else x.shape, x.dtype, x.device) for n, x in tensors}

        stacked = set(self.stacked_names)
        mine = (layout(self.template.named_parameters(), stacked), layout(self.template.named_buffers(), set()))
        return all((layout(m.named_parameters(), set()), layout(m.named_buffers(), set())) == mine for m in models)

    def load(self, models: list[nn.Module]) -> None:
        """Put ``models``' weights and buffers into this stack, in place: the memory its CUDA graphs
        read stays the same, so a later group of as many children replays the graphs an earlier
        group captured (check ``can_hold`` first)."""
        stacked = set(self.stacked_names)
        with torch.no_grad():
            for name, p in self.template.named_parameters():
                if name in stacked:
                    sources = [model.get_parameter(name) for model in models]
                    if all(source is sources[0] for source in sources):  # one model K times: one copy
                        p.copy_(sources[0].expand_as(p))
                    else:
                        for k, source in enumerate(sources):
                            p[k].copy_(source)
                else:
                    p.copy_(models[0].get_parameter(name))
            for (_, buffer), (_, theirs) in zip(self.template.named_buffers(), models[0].named_buffers()):
                buffer.copy_(theirs)
        self.last_losses = None

    def stacked_parameters(self) -> dict[str, torch.Tensor]:
        """The stacked tensors ``[K, *shape]``, by the original names."""
        return {n: self.template.get_parameter(n) for n in self.stacked_names}

    def child_parameters(self, k: int) -> dict[str, torch.Tensor]:
        """Child k's parameters (views into the stacked tensors), by the original names."""
        return {n: p[k] for n, p in self.stacked_parameters().items()}

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        on_cuda = next(self.parameters()).is_cuda
        if self.eager_attention and self.training and self.template.training and on_cuda:
            use_eager_attention(self.template)
        if self.step_graphs is not None and on_cuda and self.training and torch.is_grad_enabled():
            # (the logits of a replayed step carry no gradient: only the loss does)
            loss, logits, losses = self.step_graphs(self, inputs)
        else:
            loss, logits, losses = self.children_forward(inputs)
        self.last_losses = losses.detach()
        return {"loss": loss, "logits": logits}

    def children_forward(self, inputs: dict[str, Any], params: dict[str, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the sum of the children's losses, their logits, each child's loss), with autograd,
        from the stacked parameters or ``params`` in their place (stacked_graphs.py's aliases)."""
        params = self.stacked_parameters() if params is None else params  # shared (frozen) ones are the template's
        buffers = dict(self.template.named_buffers())

        def one_child(child_params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(self.template, (child_params, buffers), args=(), kwargs=inputs)
            return out["loss"], out["logits"]

        with PerChildAttention():  # each child's attention as it alone computes it, dropout mask included
            losses, logits = vmap(one_child, randomness="same")(params)
        # Sum: child k's slice of the gradient is d loss_k / d theta_k. A NaN child stays in its slice.
        return losses.sum(), logits, losses


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
        raise RunDirectoryError(
            f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}): the spawn checkpoint is damaged. "
            f"Restore it from a copy of the run, or train the parent again with {setting('overwrite_run')}."
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
    H100, MiniLM with batch 32 x 128 tokens estimated 15 GiB for K = 8 and used 11.7 GiB.
    Frozen parameters (a PEFT model's base) are held once, whatever K. CUDA graphs of the step
    are not counted: they are captured only where the memory they keep is free
    (stacked_graphs.py), so K is what fits without them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    state = trainable * 4 * 4
    hidden, layers, tokens_per_example = _activation_shape(model)
    tokens = args.per_device_train_batch_size * (seq_len or tokens_per_example)
    activations = 40 * hidden * tokens * layers * (2 if args.bf16 or args.fp16 else 4)
    return frozen + num_children * (state + activations)


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


def clip_per_child(model: StackedModel, max_norm: float | None) -> torch.Tensor:
    """Each child's gradient norm, and (with ``max_norm`` > 0) clipping of each child on its own,
    as torch's clip_grad_norm_ does for one model. Returns the mean norm over the children whose
    norm is finite (what the Trainer logs as grad_norm; NaN if none is), as a tensor on the device,
    so that no step waits for it; a NaN child never touches the others."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    k = grads[0].shape[0]
    norms = torch.stack([g.reshape(k, -1).float().norm(dim=1) for g in grads]).norm(dim=0)
    if max_norm is not None and max_norm > 0:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    finite = torch.isfinite(norms)
    return torch.where(finite, norms, 0.0).sum() / finite.sum()  # 0 / 0: NaN when no child is finite


# ---- policy -------------------------------------------------------------------------------------
def _stacking_problems(trainer: Any) -> list[str]:
    """What in this set-up stacked children cannot do as children alone would (empty: nothing)."""
    from transformers import Trainer

    args = trainer.args
    problems = []
    if args.world_size > 1:
        problems.append("it runs on one device (this run has several processes)")
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in ELEMENTWISE_OPTIMIZERS:
        problems.append(f"optim={optim!r}: only AdamW ({', '.join(ELEMENTWISE_OPTIMIZERS)}) is elementwise, "
                        "so that one optimizer over the stacked tensors is one optimizer per child")
    for flag in ("gradient_checkpointing", "torch_compile", "deepspeed", "fsdp"):
        if getattr(args, flag, None):
            problems.append(f"{flag} is not supported for stacked children")
    hooks = ("_clip_grad_norm", "_get_grad_norm", "_load_from_checkpoint", "_load_optimizer_and_scheduler")
    if not all(hasattr(Trainer, hook) for hook in hooks):
        problems.append(f"this transformers version lacks one of the Trainer methods {', '.join(hooks)}, through "
                        "which stacked children are clipped and resumed; upgrade transformers")
    if trainer.compute_loss_func is not None or type(trainer).compute_loss is not Trainer.compute_loss:
        problems.append("a custom loss (compute_loss_func or an overridden compute_loss) sees all children at once")
    return problems


def _memory(trainer: Any) -> tuple[Callable[[int], int], int]:
    """(the estimated peak bytes of K stacked children, as a function of K; the free bytes of the device)."""
    model = trainer.model if trainer.model is not None else trainer.call_model_init()
    seq_len = None
    try:  # the real sequence length of a batch, for the activations' share of the estimate
        first = next(iter(trainer.get_train_dataloader()))
        seq_len = int(first["input_ids"].shape[-1]) if "input_ids" in first else None
    except (StopIteration, KeyError, TypeError, AttributeError):
        pass
    return (lambda k: estimate_bytes(model, k, trainer.args, seq_len)), available_bytes(trainer.args.device)


def check_parallel_children(trainer: Any) -> None:
    """Refuse, before anything trains, what stacked children cannot do as children alone would;
    for ``parallel_children="auto"``, choose K instead (``choose_children_at_once``).

    Raises:
        StudySetupError: the set-up needs children one at a time, or the stack does not fit.
    """
    stability = trainer.stability_args
    if stability.parallel_children == AUTO:
        choose_children_at_once(trainer)
        return
    problems = _stacking_problems(trainer)
    if problems:
        raise StudySetupError(
            f"parallel_children={stability.parallel_children} cannot be used here: " + "; ".join(problems)
            + ". Set parallel_children=1 to train the children one after the other."
        )
    need, have = _memory(trainer)
    if need(stability.parallel_children) > 0.9 * have:
        raise StudySetupError(
            f"parallel_children={stability.parallel_children} needs about "
            f"{need(stability.parallel_children) / 2**30:.1f} GiB on {trainer.args.device} "
            f"(weights, gradients and AdamW state of every child plus one batch of activations each), and "
            f"{have / 2**30:.1f} GiB are free. Lower parallel_children or the batch size."
        )


def choose_children_at_once(trainer: Any) -> int:
    """``parallel_children="auto"``: the largest K, up to the most children a spawn step can
    stack, whose estimated peak (``estimate_bytes``) fits in 90% of the device's free memory; 1
    (children one after the other) where this set-up cannot stack children, with the reason in
    the log. Records K on the arguments (``children_at_once``) and returns it."""
    stability = trainer.stability_args
    problems = _stacking_problems(trainer)
    # (width 2: the children that may stack once any do; a deterministic study's control never does)
    most = max(len(stability.stackable_children(t, width=2)) for t in stability.spawn_steps)
    chosen = 1
    if problems:
        logger.info("parallel_children=auto trains the children one after the other: %s.", "; ".join(problems))
    elif most > 1:
        need, have = _memory(trainer)
        chosen = max([k for k in range(1, most + 1) if need(k) <= 0.9 * have] or [1])
        logger.info("parallel_children=auto: %d children at a time (about %.1f GiB of the %.1f GiB free on %s; a "
                    "spawn step has at most %d to stack).", chosen, need(chosen) / 2**30, have / 2**30,
                    trainer.args.device, most)
    stability.choose_children_at_once(chosen)
    return chosen


# ---- mechanism ----------------------------------------------------------------------------------
def set_up_stack(study: ButterflyStudy, run: RunDirectory, t: int, children: list[int], pending: list[int],
                 template: nn.Module, spawn: Path) -> StackedModel:
    """The stack of a group: ``children``, each with the weights of ``spawn`` (spawn step ``t``'s
    checkpoint, already checked), perturbed (the records of those in ``pending`` written, their
    stale checkpoints removed). ``template`` is left with the spawn weights.

    The stack is the study's last one where it can hold the group (its CUDA graphs replay), else a
    new one. Each child is perturbed in its own slice of the stack (``perturb_model(into=...)``),
    as a copy of the model would be: the same draws, the same IEEE operations, the same record,
    without a copy of the model per child. An init-seed child, which builds a model, is perturbed
    as a copy of the model and then stacked."""
    from .callbacks import independent_batch
    from .checkpoints import checkpoint_state_dict, load_checkpoint_weights

    trainer, stability = study.trainer, study.stability
    weights = checkpoint_state_dict(template, spawn)
    load_checkpoint_weights(template, weights)
    configs = {k: stability.config_for_child(k) for k in children}
    batches: dict[int, Any] = {}
    if any(config.kind == PerturbationKind.BATCH for config in configs.values()):
        dataloader = trainer.get_train_dataloader()
        batches = {k: independent_batch(dataloader, configs[k], t, k) for k in children}
    for k in pending:
        run.child_dir(t, k).mkdir(parents=True, exist_ok=True)
        for stale in run.child_dir(t, k).glob("checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)

    rebuilt = {k for k in children if configs[k].kind == PerturbationKind.INIT_SEED}
    models = [copy.deepcopy(template) if k in rebuilt else template for k in children]
    for k, model in zip(children, models):
        if k in rebuilt:
            _perturb_child(study, run, t, k, pending, model, configs[k])
    stack = _stack_for(study, models)
    slices = {k: index for index, k in enumerate(children) if k not in rebuilt}

    def perturb_slice(k: int) -> None:
        _perturb_child(study, run, t, k, pending, template, configs[k], batches.get(k),
                       into=stack.child_parameters(slices[k]))

    # Weight noise is drawn from each child's own CPU generator and touches no global RNG, so the
    # children are perturbed in threads (the draws dominate the set-up of a group). A gradient
    # perturbation runs a forward pass, whose dropout uses the global RNG: one at a time.
    serial = any(configs[k].kind == PerturbationKind.BATCH for k in slices)
    workers = 1 if serial or not slices else min(len(slices), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(perturb_slice, slices))
    return stack


def _perturb_child(study: ButterflyStudy, run: RunDirectory, t: int, k: int, pending: list[int], model: nn.Module,
                   config: PerturbationConfig, batch: Any = None, into: dict[str, torch.Tensor] | None = None) -> None:
    """Perturb child ``k`` (``model``, or its slice ``into``) and write its record if it is pending."""
    record = perturb_model(model, config, step=t, child=k, batch=batch, model_init=study.model_init(), into=into)
    if k in pending:
        write_json(run.perturbation_file(t, k), record.to_dict())


def _stack_for(study: ButterflyStudy, models: list[nn.Module]) -> StackedModel:
    """``models`` stacked: in the study's last stack where it can hold them (a group of as many
    children as the last one: the CUDA graphs captured for that group replay for this one, no
    warm-up, no capture), else in a new one, which becomes the study's last."""
    if study.last_stack is not None and study.last_stack.can_hold(models):
        study.last_stack.load(models)
    else:
        study.last_stack = None  # (its memory goes before the new stack takes its own)
        stability = study.stability
        study.last_stack = StackedModel(models, stack_frozen=not stability.perturbation_trainable_only,
                                        eager_attention=study.eager_attention,
                                        cuda_graphs=stability.stacked_cuda_graphs)
    return study.last_stack


def train_stacked_group(
    study: ButterflyStudy, run: RunDirectory, t: int, children: list[int], pending: list[int],
) -> None:
    """Train ``children`` of spawn step ``t`` as one stacked model, then write the final/ of each
    child in ``pending`` like a child trained alone (the others are already written). A killed
    group restarts from the spawn checkpoint."""
    from .callbacks import ChildLossCallback, StackedDivergenceCallback
    from .divergence import divergence_steps
    from .study import RunSettings, call_without_trial, run_scope

    trainer, stability = study.trainer, study.stability
    template = trainer.model if trainer.model is not None else trainer.call_model_init()
    # The dataset columns the model takes come from its forward signature: read them now, from the
    # real model, not later from the stacked model's forward(**inputs).
    trainer._set_signature_columns_if_needed()
    spawn = study.spawn_checkpoint(run, t)
    stacked = set_up_stack(study, run, t, children, pending, template, spawn)

    group_dir = run.stacked_group_dir(t, children)
    shutil.rmtree(group_dir, ignore_errors=True)
    group_dir.mkdir(parents=True)
    diverged: dict[int, dict[str, Any]] = {}
    original_init = trainer.model_init
    measured = divergence_steps(t, study.max_steps, stability.divergence_every)

    def stacked_init() -> nn.Module:
        # The global RNG must stand where it stands for a child trained alone, after train() built
        # its model (the data sampler draws its seed from it): build (and drop) one model, or, from
        # an RNG state an earlier group's build started from, set the state that build left.
        key = rng_state_key(global_rng_state())
        if key not in study.rng_after_model_init:
            call_without_trial(original_init)
            study.rng_after_model_init[key] = global_rng_state()
        set_global_rng_state(study.rng_after_model_init[key])
        return stacked

    settings = RunSettings(
        output_dir=group_dir,
        callbacks=[
            ChildLossCallback(children, diverged, sync_steps=measured),
            StackedDivergenceCallback(
                children, diverged, output_files={k: run.divergence_file(t, k) for k in pending}, spawn_step=t,
                steps=measured,
                path_for=lambda step: study.reference_file(run, step), logs=trainer.divergence_logs,
            ),
        ],
        stacked_numerics=study.stacked_numerics,
        eager_attention=study.eager_attention,
        # The group resumes from the spawn checkpoint itself (trainer state, RNG, scheduler, scaler);
        # the weights are already in the stacked model and the optimizer state is repeated K times in
        # memory (StabilityMixin._load_from_checkpoint and _load_optimizer_and_scheduler).
        stacked_optimizer_state=stacked_optimizer_state(spawn / OPTIMIZER_NAME, len(children)),
        model=stacked,
        model_init=stacked_init if original_init is not None else None,
        # no intermediate checkpoints or evaluations of the stack: each child is evaluated at the end.
        # The stack's logged loss is the sum of its children's (a diverged child is reported on its
        # own): the Trainer's NaN filter, which waits for the device at every step, is off.
        args={"save_strategy": "no", "eval_strategy": "no", "logging_nan_inf_filter": False},
        # a step of the stack waits for nothing on the host (no sync inside it): the batch copy need not either
        non_blocking_copies=True,
    )
    with run_scope(trainer, settings):
        study.train_run(spawn, settings.callbacks)
        for index, k in enumerate(children):
            if k not in pending:
                continue
            if k in diverged:
                logger.warning("Child %d of spawn step %d diverged at step %d (%s); going on.", k, t,
                               diverged[k]["step"], diverged[k]["reason"])
                write_json(run.diverged_file(t, k), diverged[k])
                continue
            trainer.model = trainer.model_wrapped = unstack_into(stacked, index, template)
            study.finalize(run.child_final(t, k), study.child_records(run, t, k))
    shutil.rmtree(group_dir, ignore_errors=True)
