"""Parallel children (StabilityArguments.parallel_children): K children of a spawn step trained
as one stacked model end as they would alone, and what the mode cannot do is refused."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert, tiny_bert_config, tiny_trainer
from safetensors.torch import load_file
from torch import nn
from torch.func import vmap
from torch.nn import functional as F
from transformers import BertForSequenceClassification

from hf_stability import StabilityArguments
from hf_stability.errors import HfStabilityError
from hf_stability.training.stacked import (
    SameMaskDropout,
    StackedModel,
    _activation_shape,
    clip_per_child,
    estimate_bytes,
    use_eager_attention,
)


def _study(out, parallel, **overrides):
    stability = dict(spawn_steps=[0, 5], num_children=3, perturbation_scale=0.5, divergence_every=5,
                     parallel_children=parallel)
    stability.update(overrides.pop("stability", {}))
    model_init = overrides.pop("model_init", None)
    # the tiny BERT has dropout 0.1: the stacked children must draw the masks a child alone draws
    training = {"max_steps": 20, "learning_rate": 3e-3, "max_grad_norm": 0.5, **overrides}
    return tiny_trainer(out, StabilityArguments(**stability), model_init=model_init, **training).butterfly()


def _unseeded_bert():
    """The tiny BERT from the global RNG (the Trainer seeds it; an init-seed child reseeds it)."""
    return BertForSequenceClassification(tiny_bert_config())


def _relative(a_dir, b_dir) -> float:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a)
    den = sum(float(a[n].double().pow(2).sum()) for n in a)
    return math.sqrt(num / den)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine"},
     {"stability": {"perturbation_kind": "batch", "perturbation_scale": 0.1}},
     # one group of a perturbed child, the init-seed reference (a model of its own) and the data-order one
     {"stability": {"spawn_steps": [0], "num_children": 1, "reference_children": 1}, "model_init": _unseeded_bert}],
    ids=["plain", "grad-accumulation-cosine", "batch-perturbation", "init-seed-reference"],
)
def test_stacked_children_end_as_sequential_children(tmp_path, overrides):
    alone = _study(tmp_path / "alone", 1, **copy.deepcopy(overrides)).run_dir
    stacked = _study(tmp_path / "stacked", 4, **copy.deepcopy(overrides)).run_dir
    spawn_steps = overrides.get("stability", {}).get("spawn_steps", [0, 5])
    for t in spawn_steps:
        for k in sorted(int(c.name[1:]) for c in (alone / f"children/t{t}").glob("c*")):  # child 0 is the control
            assert _relative(alone / f"children/t{t}/c{k}/final", stacked / f"children/t{t}/c{k}/final") < 1e-6
            assert (json.loads((stacked / f"children/t{t}/c{k}/perturbation.json").read_text())
                    == json.loads((alone / f"children/t{t}/c{k}/perturbation.json").read_text()))
            record = f"children/t{t}/c{k}/divergence.jsonl"
            rows = [json.loads(line) for line in (stacked / record).read_text().splitlines()]
            expected = [json.loads(line) for line in (alone / record).read_text().splitlines()]
            assert [r["step"] for r in rows] == [r["step"] for r in expected]
            # within 1e-6 of the weights' own norm (about 20 here): the control's 0 becomes ~1e-6
            assert [r["l2"] for r in rows] == pytest.approx([r["l2"] for r in expected], rel=1e-6, abs=2e-5)
        # the control child still equals the parent
        assert _relative(stacked / "parent/final", stacked / f"children/t{t}/c0/final") < 1e-6
    assert not list(stacked.glob("children/t*/.stacked-*"))  # the group's scratch checkpoint is gone


def test_a_nan_child_in_a_stack_is_marked_diverged_and_its_siblings_finish(tmp_path):
    result = _study(tmp_path / "run", 3, max_steps=8, stability=dict(
        spawn_steps=[4], num_children=2, perturbation_scale=1e20, perturbation_scale_mode="absolute",
        perturbation_include=["word_embeddings"]))
    status = {(r.spawn_step, r.child): r.status for r in result.children}
    assert status == {(4, 0): "done", (4, 1): "diverged", (4, 2): "diverged"}
    diverged = json.loads((result.run_dir / "children/t4/c1/diverged.json").read_text())
    assert diverged["step"] == 5 and "training loss is nan" in diverged["reason"]
    assert _relative(result.run_dir / "parent/final", result.run_dir / "children/t4/c0/final") < 1e-6


def test_stacked_groups_share_one_stack_and_copy_batches_without_waiting(tmp_path):
    """A later group of as many children trains in the earlier group's stack, loaded with its own
    weights (so its CUDA graphs replay without a new capture); a stack's batches are copied to the
    device non-blocking (a stacked step waits for nothing on the host), while the parent and the
    trainer afterwards keep the user's setting. (That such children train as they train alone:
    test_stacked_children_end_as_sequential_children, whose second group trains in the first one's
    stack.)"""
    from transformers import TrainerCallback

    class Runs(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            self.seen.append((Path(args.output_dir), model, train_dataloader._non_blocking))

    trainer = tiny_trainer(tmp_path / "run", StabilityArguments(
        spawn_steps=[2, 4], num_children=3, perturbation_scale=0.5, parallel_children=2), max_steps=8)
    runs = Runs()
    trainer.add_callback(runs)
    trainer.butterfly()
    names = [(out.parent.name, out.name) for out, _, _ in runs.seen]
    assert names == [("run", "parent"), ("t2", ".stacked-0-1.tmp"), ("t2", ".stacked-2-3.tmp"),
                     ("t4", ".stacked-0-1.tmp"), ("t4", ".stacked-2-3.tmp")]
    models = [model for _, model, _ in runs.seen]
    assert isinstance(models[1], StackedModel) and all(model is models[1] for model in models[2:])
    assert [flag for _, _, flag in runs.seen] == [False, True, True, True, True]
    assert trainer.accelerator.dataloader_config.non_blocking is False
    for t in (2, 4):
        for k in range(4):
            assert (tmp_path / f"run/children/t{t}/c{k}/final/model.safetensors").is_file()


def test_a_stack_holds_only_models_of_its_width_and_layout_and_loads_them_in_place():
    stack = StackedModel([tiny_bert(0), tiny_bert(1)])
    memory = {n: p.data_ptr() for n, p in stack.stacked_parameters().items()}
    assert not stack.can_hold([tiny_bert(2)])  # another width
    assert not stack.can_hold([tiny_bert(2), tiny_bert(3, num_labels=5)])  # another head
    others = [tiny_bert(2), tiny_bert(3)]
    assert stack.can_hold(others)
    stack.load(others)
    for name, p in stack.stacked_parameters().items():
        assert p.data_ptr() == memory[name]
        assert torch.equal(p[0], others[0].get_parameter(name)) and torch.equal(p[1], others[1].get_parameter(name))
    one = tiny_bert(4)  # one model in every slice (a group's spawn weights, before each slice is perturbed)
    stack.load([one, one])
    for name, p in stack.stacked_parameters().items():
        assert p.data_ptr() == memory[name]
        assert torch.equal(p[0], one.get_parameter(name)) and torch.equal(p[1], one.get_parameter(name))


@pytest.mark.parametrize("change, message", [
    ({"optim": "sgd"}, "only AdamW"),
    ({"stability": {"parallel_children": 10**6}}, r"needs about [0-9.]+ GiB .* GiB are free"),
])
def test_what_stacked_children_cannot_do_is_refused_before_training(tmp_path, change, message):
    with pytest.raises(HfStabilityError, match=message):
        _study(tmp_path / "run", 2, **change)
    assert not (tmp_path / "run" / "parent").exists()


def test_same_mask_dropout_draws_the_masks_that_stacked_children_draw():
    x = torch.randn(4, 8, 16)
    torch.manual_seed(1)
    native = F.dropout(x, 0.1, training=True)
    torch.manual_seed(1)
    with SameMaskDropout():
        ours = nn.Dropout(0.1)(x)
        after = torch.rand(3)
    torch.manual_seed(1)
    stacked = vmap(lambda t: F.dropout(t, 0.1, training=True), randomness="same")(torch.stack([x, 2 * x]))
    stacked_after = torch.rand(3)
    # one mask for all children, the one a model alone draws under the mode, from the same RNG draws
    assert torch.equal(ours, stacked[0]) and torch.equal(2 * ours, stacked[1]) and torch.equal(after, stacked_after)
    assert torch.equal(ours, native)  # on a CPU, F.dropout draws its mask the same way
    with SameMaskDropout():
        assert F.dropout(x, 0.1, training=False) is x and F.dropout(x, 0.0, training=True) is x
        y = x.clone()
        torch.manual_seed(1)
        out = F.dropout(y, 0.1, training=True, inplace=True)
    assert out is y and torch.equal(y, native)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_stacked_children_draw_the_attention_dropout_and_gradients_of_a_model_alone(device, bf16):
    """The per-child attention of stacked children (stacked_attention.py): with attention dropout
    only, and a padded batch, each child's logits and gradients are those of its model alone from
    the same RNG state, and the RNG ends where one model leaves it."""
    # weights large enough (init 0.3) that another dropout mask moves the logits by about 2
    models = [tiny_bert(seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5, initializer_range=0.3)
              .to(device).train() for seed in range(3)]
    stacked = StackedModel(models).train()
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding: the attention mask reaches SDPA
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1], device=device)}

    def forward(model, seed=7):
        torch.manual_seed(seed)
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            return model(**batch)

    def relative(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm())

    out = forward(stacked)
    out["loss"].backward()
    after = torch.rand(4, device=device)
    # bf16 matmuls of a stack and of one model may round differently; the masks are the same
    tolerance = 2e-2 if bf16 else 1e-5
    for index, model in enumerate(models):
        alone = forward(model)
        alone.loss.backward()
        assert torch.equal(torch.rand(4, device=device), after)
        assert relative(out["logits"][index], alone.logits) < tolerance
        # the whole gradient at once (some entries, a key bias, are zero up to rounding)
        names = [name for name, _ in model.named_parameters()]
        assert relative(torch.cat([stacked.template.get_parameter(n).grad[index].flatten() for n in names]),
                        torch.cat([model.get_parameter(n).grad.flatten() for n in names])) < tolerance
        with torch.no_grad():  # another mask is far outside the tolerance: the comparison sees masks
            assert relative(forward(model, seed=8).logits, alone.logits) > 5 * tolerance


@pytest.mark.parametrize("mask_per_child", [False, True], ids=["shared-mask", "mask-per-child"])
def test_per_child_attention_gives_every_input_its_gradient_alone(mask_per_child):
    """Under vmap, PerChildAttention's output and the gradients of queries, values and a learnt
    mask (shared by the children: the sum of theirs) are those of each child alone; keys that
    need no gradient get none."""
    from hf_stability.training.stacked_attention import PerChildAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 8, 16, generator=g) for _ in range(3))
    q.requires_grad_(), v.requires_grad_()
    mask = torch.randn(*((3,) if mask_per_child else ()), 2, 1, 8, 8, generator=g).requires_grad_()

    def attention(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.3)

    torch.manual_seed(5)
    with PerChildAttention():
        out = vmap(attention, in_dims=(0, 0, 0, 0 if mask_per_child else None), randomness="same")(q, k, v, mask)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    assert k.grad is None
    mask_total = torch.zeros_like(mask)
    for i in range(3):
        qi, vi = q[i].detach().requires_grad_(), v[i].detach().requires_grad_()
        mi = (mask[i] if mask_per_child else mask).detach().requires_grad_()
        torch.manual_seed(5)
        alone = attention(qi, k[i], vi, mi)
        alone.backward(grad[i])
        assert torch.allclose(alone, out[i], atol=1e-6)
        assert torch.allclose(qi.grad, q.grad[i], atol=1e-6) and torch.allclose(vi.grad, v.grad[i], atol=1e-6)
        if mask_per_child:
            assert torch.allclose(mi.grad, mask.grad[i], atol=1e-6)
        else:
            mask_total += mi.grad
    if not mask_per_child:
        assert torch.allclose(mask_total, mask.grad, atol=1e-6)


def test_eager_attention_keeps_the_function_of_transformers_and_timm_models():
    from hf_stability.studies.image_classification import ImageModelArguments, build_image_model

    pixels = torch.randn(2, 1, 28, 28)
    for model_type in ("vit", "timm"):
        arguments = ImageModelArguments(model_type=model_type, model_name_or_path="", num_hidden_layers=2)
        model = build_image_model(arguments, num_labels=5).eval()
        if model_type == "timm":
            for module in model.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = True
        before = model(pixel_values=pixels).logits
        use_eager_attention(model)
        assert not any(getattr(m, "fused_attn", False) for m in model.modules())
        assert getattr(model.config, "_attn_implementation", "eager") == "eager"
        assert torch.allclose(model(pixel_values=pixels).logits, before, atol=1e-5)


def test_memory_estimate_reads_the_shape_of_text_and_vision_transformers():
    from transformers import TrainingArguments

    from hf_stability.studies.image_classification import ImageModelArguments, build_image_model

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=8, use_cpu=True, report_to="none")
    for model_type in ("vit", "timm"):
        model = build_image_model(ImageModelArguments(model_type=model_type, model_name_or_path=""), num_labels=5)
        width, blocks, tokens = _activation_shape(model)
        assert (width, blocks, tokens) == (192, 6, (28 // 4) ** 2 + 1)
        params = sum(p.numel() for p in model.parameters())
        assert estimate_bytes(model, 2, args, None) == 2 * (params * 16 + 40 * 192 * 8 * tokens * 6 * 4)
    bert = tiny_bert(0)
    assert _activation_shape(bert) == (bert.config.hidden_size, bert.config.num_hidden_layers,
                                       bert.config.max_position_embeddings)


def test_parallel_children_takes_a_count_or_auto_from_python_and_flags():
    from transformers import HfArgumentParser

    parser = HfArgumentParser((StabilityArguments,))
    assert parser.parse_args_into_dataclasses(["--parallel_children", "auto"])[0].parallel_children == "auto"
    assert parser.parse_args_into_dataclasses(["--parallel_children", "3"])[0].parallel_children == 3
    assert StabilityArguments(parallel_children="AUTO").parallel_children == "auto"
    assert StabilityArguments(parallel_children=4).children_at_once == 4
    assert StabilityArguments(parallel_children="auto").children_at_once == 1  # until the study chooses
    for bad in (0, "two", 1.5, True, "-2"):
        with pytest.raises(HfStabilityError, match="parallel_children must be a count >= 1 or 'auto'"):
            StabilityArguments(parallel_children=bad)


def test_auto_parallel_children_stacks_what_fits_and_else_trains_one_child_at_a_time(tmp_path, caplog):
    stability = dict(spawn_steps=[4], num_children=2)
    with caplog.at_level(logging.INFO, logger="hf_stability.training.stacked"):
        run = _study(tmp_path / "auto", "auto", max_steps=8, stability=stability).run_dir
    # a tiny BERT fits many times over: the control and both children of the step train as one stack
    assert "parallel_children=auto: 3 children at a time" in caplog.text
    config = json.loads((run / "stability_config.json").read_text())
    assert config["stacked_numerics"] is True and config["stability_arguments"]["parallel_children"] == "auto"
    assert _relative(run / "parent/final", run / "children/t4/c0/final") < 1e-6
    # SGD is not elementwise, so children cannot be stacked: "auto" trains them one after the other (an
    # explicit parallel_children=2 is refused: test_what_stacked_children_cannot_do_is_refused_before_training)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_stability.training.stacked"):
        run = _study(tmp_path / "sgd", "auto", max_steps=8, optim="sgd", stability=stability).run_dir
    assert "parallel_children=auto trains the children one after the other: optim='sgd'" in caplog.text
    assert json.loads((run / "stability_config.json").read_text())["stacked_numerics"] is False
    assert _relative(run / "parent/final", run / "children/t4/c0/final") == 0.0


def test_per_child_clipping_clips_each_child_alone_and_logs_the_mean_of_the_finite_norms():
    stacked = StackedModel([nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)])
    for p in stacked.parameters():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + 1.0
        p.grad[2] = float("nan")  # child 2's gradient is NaN
    alone = [torch.cat([p.grad[k].reshape(-1) for p in stacked.parameters()]).norm() for k in range(3)]
    mean = clip_per_child(stacked, max_norm=0.5)
    assert isinstance(mean, torch.Tensor)  # no wait for the device
    assert mean.item() == pytest.approx(float((alone[0] + alone[1]) / 2))
    for k in range(2):  # each finite child clipped to 0.5 on its own
        assert torch.cat([p.grad[k].reshape(-1) for p in stacked.parameters()]).norm().item() == pytest.approx(0.5,
                                                                                                              rel=1e-5)
    for p in stacked.parameters():
        p.grad.fill_(float("inf"))
    assert math.isnan(clip_per_child(stacked, max_norm=None).item())  # no finite child: NaN, as one child's would be


def test_a_stacked_run_made_before_per_child_attention_keeps_eager_attention(tmp_path):
    """A run's attention is fixed when it is created: one whose stability_config.json predates
    per-child attention (no "stacked_attention") resumes with eager attention on CUDA for every
    model, as its parent trained; a new one uses per-child SDPA."""
    from hf_stability.run_directory import RunDirectory
    from hf_stability.training.preflight import check_study
    from hf_stability.training.stacked_attention import attention_for_stacked_run
    from hf_stability.training.study import ButterflyStudy

    def prepared(run_dir):
        stability = StabilityArguments(spawn_steps=[4], num_children=1, parallel_children=2, perturbation_scale=0.5,
                                       divergence_every=5)
        trainer = tiny_trainer(run_dir, stability, max_steps=8, learning_rate=3e-3, max_grad_norm=0.5)
        study = ButterflyStudy(trainer)
        study.max_steps = check_study(trainer)
        study.prepare(RunDirectory(run_dir))
        return study

    run = _study(tmp_path / "run", 2, max_steps=8, stability=dict(spawn_steps=[4], num_children=1)).run_dir
    config = json.loads((run / "stability_config.json").read_text())
    assert config["stacked_attention"] == "per_child" and prepared(run).eager_attention is False
    del config["stacked_attention"]
    (run / "stability_config.json").write_text(json.dumps(config))
    assert prepared(run).eager_attention is True
    # what each flag means for a model: eager on CUDA only for the old runs; else SDPA for any kernel
    model = tiny_bert(0, attn_implementation="sdpa")
    attention_for_stacked_run(model, eager=True, device=torch.device("cpu"))
    assert model.config._attn_implementation == "sdpa"
    attention_for_stacked_run(model, eager=True, device=torch.device("cuda"))
    assert model.config._attn_implementation == "eager"
    model.config._attn_implementation = "flash_attention_2"  # (not installed here: only the name is read)
    attention_for_stacked_run(model, eager=False, device=torch.device("cuda"))
    assert model.config._attn_implementation == "sdpa"
