"""perturb_model: apply a PerturbationConfig to a model, in place, and say what changed."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic_io import write_json
from ..errors import PerturbationConfigError, UnknownInitScaleError
from .config import RNG_KINDS, PerturbationConfig, PerturbationKind, ScaleMode
from .rng import derive_seed, make_generator, preserve_global_rng
from .scales import init_scales, param_scales
from .selection import choose_entries, select_parameters

#: Indices of changed entries are recorded for tensors with at most this many changes.
MAX_RECORDED_INDICES = 64


@dataclass
class TensorChange:
    """What a perturbation did to one parameter tensor."""

    name: str
    shape: list[int]
    entries_total: int
    entries_changed: int
    scale: float
    noise_l2: float
    change_l2: float
    indices: list[int] | None = None
    deltas: list[float] | None = None  # after - before of each recorded index, exactly (float64)


@dataclass
class PerturbationRecord:
    """What a perturbation changed: saved as ``perturbation.json`` beside each child.

    ``noise_l2`` is the L2 norm of the noise that was drawn; ``change_l2`` the L2 norm of the
    actual change of the weights (they differ only by rounding to the parameter dtype).
    ``init_l2`` is ``sqrt(sum_p s_p^2 n_p)`` over every selected tensor, the L2 norm of an
    initialisation, and ``relative_size`` is ``change_l2 / init_l2``: the size of any
    perturbation, from one weight to another init, on one axis (the paper's normalisation).
    ``reseed`` is the new data, dropout or init seed of the ``data_order``, ``dropout`` and
    ``init_seed`` kinds.
    """

    kind: str
    step: int
    child: int
    seed: int
    generator_seed: int
    config: dict[str, Any]
    entries_total: int = 0
    entries_changed: int = 0
    noise_l2: float = 0.0
    change_l2: float = 0.0
    expected_init_l2: float = 0.0
    init_l2: float | None = None
    relative_size: float | None = None
    reseed: int | None = None
    tensors: list[TensorChange] = field(default_factory=list)
    note: str | None = None

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerturbationRecord:
        data = dict(data)
        data["tensors"] = [TensorChange(**t) for t in data.get("tensors", [])]
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> PerturbationRecord:
        from ..run_files import read_json

        return cls.from_dict(read_json(path, "It was written by PerturbationRecord.save; write it again."))


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return getattr(outputs, "loss", None)


def _batch_gradient(
    model: nn.Module, params: dict[str, nn.Parameter], batch: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Loss gradient of ``batch`` for each selected parameter, with dropout off (eval mode)."""
    device = next(iter(params.values())).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    frozen = [p for p in params.values() if not p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = _loss_of(model(**inputs))
            if loss is None:
                raise PerturbationConfigError(
                    "kind='batch' needs a batch the model returns a loss for: include the labels "
                    f"(the batch had keys {sorted(inputs)})."
                )
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return {
        name: (g if g is not None else torch.zeros_like(p)).detach().float().cpu()
        for (name, p), g in zip(params.items(), grads)
    }


def _entries(tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat if index is None else flat[index]


def perturb_model(
    model: nn.Module,
    config: PerturbationConfig,
    *,
    step: int = 0,
    child: int = 0,
    batch: Mapping[str, Any] | None = None,
    model_init: Callable[[], nn.Module] | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> PerturbationRecord:
    """Perturb ``model`` in place as ``config`` says and return what changed.

    The noise is drawn from a CPU generator seeded by ``(config.seed, step, child)``; the
    python, numpy and torch global RNG states are the same after the call as before.
    ``batch`` (a dict of tensors with labels) is needed for ``kind='batch'`` only;
    ``model_init`` (builds the model from the global RNG, as the Trainer's does) for
    ``kind='init_seed'`` only: it is called with the global RNG seeded by the record's
    ``reseed``. ``into`` (parameter name -> tensor of that parameter's shape and dtype, holding
    the same values) perturbs those tensors in place instead of the model's own, which stay as
    they are: one child's slice of a stack of children, perturbed alike without a copy of the
    model; the model still gives the names, the selection, the scales and any batch gradient.

    Raises:
        NoMatchingParametersError: the include/exclude patterns select nothing, or fewer entries
            than ``num_entries``.
        UnknownInitScaleError: ``scale_mode='init'`` for a tensor whose initialiser is not known.
        PerturbationConfigError: ``kind='batch'`` without a batch (or one that gives no gradient),
            ``kind='init_seed'`` without a ``model_init`` (or one that seeds itself), ``kind='init_seed'``
            with ``into``, ``into`` without a selected parameter or with another shape or dtype, or a
            parameter sharded away from this process (FSDP, ZeRO-3).
    """
    generator_seed = derive_seed(config.seed, step, child)
    record = PerturbationRecord(
        kind=config.kind,
        step=int(step),
        child=int(child),
        seed=int(config.seed),
        generator_seed=generator_seed,
        config=config.to_dict(),
    )
    if config.kind in RNG_KINDS or config.kind == PerturbationKind.INIT_SEED:
        record.reseed = derive_seed(config.seed, step, child, stream=1) & 0x7FFFFFFF
    if config.kind == PerturbationKind.INIT_SEED:
        if into is not None:
            raise PerturbationConfigError("kind='init_seed' rebuilds the model itself: perturb the model, not into=.")
        return _reinitialise(model, config, record, model_init)
    if config.kind in RNG_KINDS:
        return record
    if not config.changes_weights:
        return record  # the control: nothing is touched, not even -0.0 -> +0.0
    if config.kind == PerturbationKind.BATCH and batch is None:
        raise PerturbationConfigError("kind='batch' needs a batch: pass batch={...} with inputs and labels.")

    # Noise comes from the perturbation's own generator; only the batch gradient's forward pass may
    # touch a global RNG. (Not restoring it otherwise lets several children be perturbed in threads.)
    keep_rng = preserve_global_rng() if config.kind == PerturbationKind.BATCH else contextlib.nullcontext()
    with keep_rng, torch.no_grad():
        params = select_parameters(model, config.include, config.exclude, config.trainable_only)
        frozen = sum(1 for _, p in model.named_parameters() if p.is_floating_point() and not p.requires_grad)
        if config.trainable_only and frozen:
            record.note = (f"Only trainable parameters were perturbed: {frozen} frozen tensors were left as they are "
                           "(perturb them with trainable_only=False).")
        sharded = [name for name, p in params.items() if p.numel() == 0]
        if sharded:
            raise PerturbationConfigError(
                f"Parameter {sharded[0]!r} has no local entries (sharded by FSDP or DeepSpeed ZeRO-3?). "
                "Perturb with DDP or on one process; sharded parameters are not supported."
            )
        targets = params if into is None else _targets(params, into)
        generator = make_generator(config.seed, step, child)
        single = config.kind == PerturbationKind.SINGLE_WEIGHT
        entries = choose_entries(
            {name: p.numel() for name, p in params.items()}, generator, config.fraction,
            1 if single else config.num_entries,
        )
        scales = _scales(model, params, config.scale_mode)
        counts = {name: (p.numel() if entries[name] is None else int(entries[name].numel()))
                  for name, p in params.items()}
        expected = math.sqrt(sum(scales[n] ** 2 * counts[n] for n in params))
        init_l2 = math.sqrt(sum(scales[n] ** 2 * p.numel() for n, p in params.items()))
        selected = sum(p.numel() for p in params.values())
        if single:  # only the tensor holding the chosen entry is touched (and recorded)
            params = {n: p for n, p in params.items() if counts[n]}

        gradients = _batch_gradient(model, params, batch) if config.kind == PerturbationKind.BATCH else None
        if gradients is not None:
            gradient_norm = math.sqrt(
                sum(float(_entries(gradients[n], entries[n]).double().pow(2).sum()) for n in params)
            )
            if not math.isfinite(gradient_norm) or gradient_norm == 0.0:
                raise PerturbationConfigError(
                    f"The gradient on the perturbation batch has norm {gradient_norm}: it gives no direction. "
                    "Check the batch (labels present?) and the selected parameters."
                )
            gradient_factor = math.sqrt(sum(counts.values())) / gradient_norm
        draw_state = generator.get_state()

        def direction(name: str) -> torch.Tensor:
            if gradients is not None:
                return _entries(gradients[name], entries[name]) * gradient_factor
            if single:  # a random sign: the size is exactly scale * s_p
                return torch.randint(0, 2, (1,), generator=generator).to(torch.float32) * 2 - 1
            return torch.randn(counts[name], generator=generator, dtype=torch.float32)

        factor = config.scale
        if config.normalize:
            drawn = math.sqrt(sum(float((direction(n).double() * scales[n]).pow(2).sum()) for n in params))
            factor = config.scale * expected / drawn if drawn > 0 else 0.0
            generator.set_state(draw_state)  # replay the same draws for applying

        # The draws are made on the CPU; scaling (exact IEEE float64 arithmetic, the same on any
        # device), rounding and the norms run where the parameter lives, and the norms come back
        # in one transfer at the end rather than one wait for the device per tensor.
        pending: list[tuple[str, nn.Parameter, torch.Tensor, list[int] | None, list[float] | None]] = []
        for name, p in params.items():
            target = targets[name].detach()
            index = entries[name]
            index = index.to(target.device) if index is not None else None
            # (in place where the tensor is this loop's own: the same IEEE operations, fewer copies)
            noise = direction(name).to(target.device).to(torch.float64, copy=True).mul_(factor * scales[name])
            before = _entries(target, index).to(torch.float64, copy=True)
            flat = target.view(-1)
            values = noise.to(target.dtype)
            if index is None:
                flat.add_(values)
            else:
                flat.index_add_(0, index, values)
            delta = _entries(target, index).to(torch.float64, copy=True).sub_(before)
            recorded = index is not None and index.numel() <= MAX_RECORDED_INDICES
            norms = torch.stack([delta.norm(), noise.norm()])
            pending.append((name, p, norms, index.tolist() if recorded else None,
                            delta.cpu().tolist() if recorded else None))
        device = pending[0][2].device if pending else None
        all_norms = torch.stack([norms.to(device) for _, _, norms, _, _ in pending]).tolist() if pending else []
        total_noise_sq = 0.0
        total_change_sq = 0.0
        for (name, p, _, indices, deltas), (change_l2, noise_l2) in zip(pending, all_norms):
            total_noise_sq += noise_l2**2
            total_change_sq += change_l2**2
            record.tensors.append(
                TensorChange(
                    name=name,
                    shape=list(p.shape),
                    entries_total=p.numel(),
                    entries_changed=counts[name],
                    scale=scales[name],
                    noise_l2=noise_l2,
                    change_l2=change_l2,
                    indices=indices,
                    deltas=deltas,
                )
            )
        record.entries_total = selected
        record.entries_changed = sum(counts.values())
        record.noise_l2 = math.sqrt(total_noise_sq)
        record.change_l2 = math.sqrt(total_change_sq)
        record.expected_init_l2 = config.scale * expected
        _set_size(record, init_l2)
    return record


def _targets(params: dict[str, nn.Parameter], into: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``into`` for the selected parameters, checked to stand in for them."""
    targets = {}
    for name, p in params.items():
        target = into.get(name)
        if target is None or target.shape != p.shape or target.dtype != p.dtype or not target.is_contiguous():
            found = "none" if target is None else f"{tuple(target.shape)} {target.dtype}"
            raise PerturbationConfigError(
                f"into= must hold a contiguous tensor of shape {tuple(p.shape)} and dtype {p.dtype} for the selected "
                f"parameter {name!r} (found {found}): pass one for every parameter the config selects."
            )
        targets[name] = target
    return targets


def _scales(model: nn.Module, params: dict[str, nn.Parameter], mode: ScaleMode) -> dict[str, float]:
    if mode == ScaleMode.INIT:
        return init_scales(model, list(params))
    if mode == ScaleMode.PARAM:
        return param_scales(params)
    return {name: 1.0 for name in params}


def _set_size(record: PerturbationRecord, init_l2: float) -> None:
    record.init_l2 = init_l2
    record.relative_size = record.change_l2 / init_l2 if init_l2 > 0 else None


def _reinitialise(model: nn.Module, config: PerturbationConfig, record: PerturbationRecord,
                  model_init: Callable[[], nn.Module] | None) -> PerturbationRecord:
    """kind='init_seed': the selected weights become those of ``model_init()`` under the
    global seed ``record.reseed`` (the global RNG is put back afterwards)."""
    from transformers import set_seed

    if model_init is None:
        raise PerturbationConfigError(
            "kind='init_seed' builds another initialisation and needs the model_init that built this one: pass "
            "model_init= to perturb_model or PerturbationCallback (StabilityTrainer: build the Trainer with "
            "model_init=...)."
        )
    with preserve_global_rng(), torch.no_grad():
        params = select_parameters(model, config.include, config.exclude, config.trainable_only)
        set_seed(int(record.reseed))
        fresh = dict(model_init().named_parameters())
        missing = sorted(set(params) - set(fresh))
        if missing:
            raise PerturbationConfigError(
                f"model_init builds a model without the parameter {missing[0]!r} of the model being trained: "
                "kind='init_seed' needs model_init to build the same architecture."
            )
        try:
            scales = _scales(model, params, config.scale_mode)
        except UnknownInitScaleError:  # the change is still recorded, its relative size is not known
            scales = {name: 0.0 for name in params}
        total_sq = 0.0
        for name, p in params.items():
            before = p.detach().double().clone()
            p.data.copy_(fresh[name].detach().to(device=p.device, dtype=p.dtype).view_as(p))
            change_l2 = float((p.detach().double() - before).norm())
            total_sq += change_l2**2
            record.tensors.append(TensorChange(name=name, shape=list(p.shape), entries_total=p.numel(),
                                               entries_changed=p.numel(), scale=scales[name], noise_l2=change_l2,
                                               change_l2=change_l2))
        if total_sq == 0.0:
            raise PerturbationConfigError(
                "model_init built the same weights under another seed: it seeds the random number generator "
                "itself. Remove its set_seed call (the Trainer seeds before it calls model_init), so that "
                "kind='init_seed' gets another initialisation."
            )
        record.entries_total = record.entries_changed = sum(p.numel() for p in params.values())
        record.noise_l2 = record.change_l2 = math.sqrt(total_sq)
        _set_size(record, math.sqrt(sum(scales[n] ** 2 * p.numel() for n, p in params.items())))
    return record
