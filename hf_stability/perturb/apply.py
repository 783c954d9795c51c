"""perturb_model: apply a PerturbationConfig to a model, in place, and say what changed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic_io import write_json
from ..errors import PerturbationConfigError
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


@dataclass
class PerturbationRecord:
    """What a perturbation changed: saved as ``perturbation.json`` beside each child.

    ``noise_l2`` is the L2 norm of the noise that was drawn; ``change_l2`` the L2 norm of the
    actual change of the weights (they differ only by rounding to the parameter dtype).
    ``reseed`` is the new data or dropout seed of the ``data_order`` and ``dropout`` kinds.
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
    reseed: int | None = None
    tensors: list[TensorChange] = field(default_factory=list)

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
) -> PerturbationRecord:
    """Perturb ``model`` in place as ``config`` says and return what changed.

    The noise is drawn from a CPU generator seeded by ``(config.seed, step, child)``; the
    python, numpy and torch global RNG states are the same after the call as before.
    ``batch`` (a dict of tensors with labels) is needed for ``kind='batch'`` only.

    Raises:
        NoMatchingParametersError: the include/exclude patterns select nothing, or fewer entries
            than ``num_entries``.
        UnknownInitScaleError: ``scale_mode='init'`` for a tensor whose initialiser is not known.
        PerturbationConfigError: ``kind='batch'`` without a batch (or one that gives no gradient), or
            a parameter sharded away from this process (FSDP, ZeRO-3).
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
    if config.kind in RNG_KINDS:
        record.reseed = derive_seed(config.seed, step, child, stream=1) & 0x7FFFFFFF
        return record
    if not config.changes_weights:
        return record  # the control: nothing is touched, not even -0.0 -> +0.0
    if config.kind == PerturbationKind.BATCH and batch is None:
        raise PerturbationConfigError("kind='batch' needs a batch: pass batch={...} with inputs and labels.")

    with preserve_global_rng(), torch.no_grad():
        params = select_parameters(model, config.include, config.exclude)
        sharded = [name for name, p in params.items() if p.numel() == 0]
        if sharded:
            raise PerturbationConfigError(
                f"Parameter {sharded[0]!r} has no local entries (sharded by FSDP or DeepSpeed ZeRO-3?). "
                "Perturb with DDP or on one process; sharded parameters are not supported."
            )
        generator = make_generator(config.seed, step, child)
        entries = choose_entries(
            {name: p.numel() for name, p in params.items()}, generator, config.fraction, config.num_entries
        )
        if config.scale_mode == ScaleMode.INIT:
            scales = init_scales(model, list(params))
        elif config.scale_mode == ScaleMode.PARAM:
            scales = param_scales(params)
        else:
            scales = {name: 1.0 for name in params}
        counts = {name: (p.numel() if entries[name] is None else int(entries[name].numel()))
                  for name, p in params.items()}
        expected = math.sqrt(sum(scales[n] ** 2 * counts[n] for n in params))

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
            return torch.randn(counts[name], generator=generator, dtype=torch.float32)

        factor = config.scale
        if config.normalize:
            drawn = math.sqrt(sum(float((direction(n).double() * scales[n]).pow(2).sum()) for n in params))
            factor = config.scale * expected / drawn if drawn > 0 else 0.0
            generator.set_state(draw_state)  # replay the same draws for applying

        total_noise_sq = 0.0
        total_change_sq = 0.0
        for name, p in params.items():
            noise = direction(name).double() * (factor * scales[name])
            index = entries[name]
            before = _entries(p.detach(), index.to(p.device) if index is not None else None).clone()
            flat = p.data.view(-1)
            values = noise.to(device=p.device, dtype=p.dtype)
            if index is None:
                flat.add_(values)
            else:
                flat.index_add_(0, index.to(p.device), values)
            after = _entries(p.detach(), index.to(p.device) if index is not None else None)
            change_l2 = float((after.double() - before.double()).norm())
            noise_l2 = float(noise.norm())
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
                    indices=index.tolist() if index is not None and index.numel() <= MAX_RECORDED_INDICES else None,
                )
            )
        record.entries_total = sum(p.numel() for p in params.values())
        record.entries_changed = sum(counts.values())
        record.noise_l2 = math.sqrt(total_noise_sq)
        record.change_l2 = math.sqrt(total_change_sq)
        record.expected_init_l2 = config.scale * expected
    return record
