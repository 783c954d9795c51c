"""Perturbations of every size in one study, and the two reference kinds (another init seed,
another data order): the single-weight kind, the init-seed kind, the children's layout, and the
paper's grid at tiny size (ViT from scratch) through to its plot and card section."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from helpers import tiny_bert_config
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, TrainingArguments, set_seed

from hf_stability import PerturbationConfig, StabilityArguments, perturb_model
from hf_stability.errors import PerturbationConfigError, SpawnStepError, StudyArgumentsError, StudySetupError
from hf_stability.perturb import init_scales
from hf_stability.training import PerturbationCallback


def _fresh_bert() -> BertForSequenceClassification:
    """A model_init as the Trainer wants it: the Trainer seeds the RNG, this builds from it."""
    return BertForSequenceClassification(tiny_bert_config())


def _global_rng_state():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


def test_one_weight_moves_by_exactly_its_init_std_times_the_size_and_is_recorded():
    model = _fresh_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = _global_rng_state()
    record = perturb_model(model, PerturbationConfig(kind="single_weight", scale=3.0), step=5, child=2)
    changed = [(n, int(i)) for n, p in model.named_parameters()
               for i in torch.nonzero((p.detach() != before[n]).view(-1)).flatten()]
    assert len(changed) == 1 and record.entries_changed == 1
    name, index = changed[0]
    (tensor,) = record.tensors
    assert (tensor.name, tensor.indices) == (name, [index])
    s_p = init_scales(model, [name])[name]
    delta = float(model.get_parameter(name).detach().view(-1)[index].double() - before[name].view(-1)[index].double())
    assert tensor.deltas == [delta] and abs(delta) == pytest.approx(3.0 * s_p, rel=1e-6)  # fp32 rounding only
    selected = sum(p.numel() for p in model.parameters())
    assert record.entries_total == selected
    assert record.init_l2 == pytest.approx(math.sqrt(sum(init_scales(model, list(before))[n] ** 2 * t.numel()
                                                         for n, t in before.items())))
    assert record.relative_size == pytest.approx(abs(delta) / record.init_l2)
    rng_after = _global_rng_state()
    assert rng_after[0] == rng[0] and np.array_equal(rng_after[1], rng[1]) and torch.equal(rng_after[2], rng[2])
    # another child moves another weight, or the same one the other way; the same child the same one
    again = _fresh_bert()
    again.load_state_dict({**before})
    assert perturb_model(again, PerturbationConfig(kind="single_weight", scale=3.0), step=5, child=2).tensors[0] \
        .deltas == [delta]


def test_a_single_weight_takes_no_fraction_count_or_normalisation():
    for extra in ({"num_entries": 2}, {"fraction": 0.5}, {"normalize": True}):
        with pytest.raises(PerturbationConfigError, match="kind='single_weight' perturbs exactly one entry"):
            PerturbationConfig(kind="single_weight", scale=1.0, **extra)


def test_another_init_seed_is_model_init_under_the_recorded_seed_and_the_rng_is_put_back():
    set_seed(0)
    model = _fresh_bert()
    rng = _global_rng_state()
    record = perturb_model(model, PerturbationConfig(kind="init_seed"), step=0, child=7, model_init=_fresh_bert)
    rng_after = _global_rng_state()
    assert rng_after[0] == rng[0] and np.array_equal(rng_after[1], rng[1]) and torch.equal(rng_after[2], rng[2])
    set_seed(record.reseed)
    expected = _fresh_bert()
    for name, p in model.named_parameters():
        assert torch.equal(p, expected.get_parameter(name)), name
    assert record.relative_size == pytest.approx(math.sqrt(2), rel=0.1)  # two independent draws of one init


def test_another_init_seed_needs_a_model_init_that_does_not_seed_itself():
    with pytest.raises(PerturbationConfigError, match="needs the model_init"):
        perturb_model(_fresh_bert(), PerturbationConfig(kind="init_seed"), step=0, child=1)

    def seeds_itself():
        torch.manual_seed(0)
        return _fresh_bert()

    with pytest.raises(PerturbationConfigError, match="it seeds the random number generator itself"):
        perturb_model(seeds_itself(), PerturbationConfig(kind="init_seed"), step=0, child=1, model_init=seeds_itself)
    with pytest.raises(SpawnStepError, match="happens at step 0"):
        PerturbationCallback(PerturbationConfig(kind="init_seed"), at_step=3, model_init=_fresh_bert)


def test_the_children_of_every_size_and_the_references_are_laid_out_per_spawn_step():
    args = StabilityArguments(spawn_steps=[0, 10], num_children=2, perturbation_scales=[0.01, 1.0],
                              single_weight_scales=[1.0], reference_children=1, parallel_children=4,
                              deterministic=True)
    kinds = {k: (args.config_for_child(k).kind.value, args.config_for_child(k).scale) for k in args.child_indices()}
    assert kinds == {0: ("none", 0.0), 1: ("gaussian", 0.01), 2: ("gaussian", 0.01), 3: ("gaussian", 1.0),
                     4: ("gaussian", 1.0), 5: ("single_weight", 1.0), 6: ("single_weight", 1.0),
                     7: ("init_seed", 0.0), 8: ("data_order", 0.0)}
    assert args.children_at(0) == list(range(9)) and args.children_at(10) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert args.references() == {7: "init_seed", 8: "data_order"}
    # stacked four at a time; the data-order child and the deterministic control alone
    assert args.child_groups(0) == [[1, 2, 3, 4], [5, 6, 7], [0], [8]]
    assert args.child_groups(10) == [[1, 2, 3, 4], [5, 6], [0], [8]]
    plan = args.plan()
    assert plan["children_at"] == {"t0": list(range(9)), "t10": [0, 1, 2, 3, 4, 5, 6, 8]}
    assert "c7" not in plan["perturbations"]["t10"] and plan["references"] == {"c7": "init_seed", "c8": "data_order"}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"spawn_steps": [5], "reference_children": 1}, SpawnStepError, "lacks it: add 0"),
    ({"perturbation_kind": "init_seed", "spawn_steps": [5]}, SpawnStepError, "a child of spawn step 0"),
    ({"perturbation_scales": [0.1, 0.1]}, StudyArgumentsError, "perturbation_scales must be distinct"),
    ({"perturbation_scales": []}, StudyArgumentsError, "perturbation_scales is empty"),
    ({"reference_children": -1}, StudyArgumentsError, "reference_children must be >= 0"),
    ({"single_weight_scales": [-1.0]}, PerturbationConfigError, "finite number >= 0"),
    ({"perturbation_kind": "single_weight", "perturbation_num_entries": 3}, PerturbationConfigError,
     "perturbs exactly one entry"),
])
def test_bad_sizes_and_references_are_refused_with_what_to_do(kwargs, error, message):
    with pytest.raises(error, match=message):
        StabilityArguments(**kwargs)


def test_an_init_seed_reference_needs_a_trainer_built_with_model_init(tmp_path):
    from helpers import tweets

    from hf_stability import StabilityTrainer

    train, test = tweets()
    trainer = StabilityTrainer(model=_fresh_bert(), args=TrainingArguments(str(tmp_path / "run"), max_steps=4,
                                                                          use_cpu=True, report_to="none"),
                               train_dataset=train, eval_dataset=test,
                               stability_args=StabilityArguments(spawn_steps=[0], reference_children=1))
    with pytest.raises(StudySetupError, match="model_init=<a function returning a fresh model>"):
        trainer.butterfly()
    assert not (tmp_path / "run" / "parent").exists()


def test_the_papers_grid_at_tiny_size_a_vit_from_scratch(tmp_path):
    """Spawn steps 0, 1 and 4 x one weight and two noise sizes x two children, the control and one
    reference child of each kind, stacked: the control stays bitwise the parent, every child's
    perturbation is what its record says, and the report has a row, a point and a card line for
    every size and reference."""
    from hf_stability.analysis import AnalyzeArguments, analyze_run
    from hf_stability.report import write_report
    from hf_stability.studies.image_classification import (
        ImageDataArguments,
        ImageModelArguments,
        build_image_classification_trainer,
    )

    run = tmp_path / "run"
    stability = StabilityArguments(spawn_steps=[0, 1, 4], num_children=2, perturbation_scales=[0.01, 1.0],
                                   single_weight_scales=[1.0], reference_children=1, parallel_children=8,
                                   deterministic=True, divergence_every=4, analysis_train_samples=64)
    training = TrainingArguments(str(run), max_steps=8, per_device_train_batch_size=16, learning_rate=3e-3,
                                 warmup_steps=1, seed=3, use_cpu=True, report_to="none", save_strategy="no",
                                 disable_tqdm=True, dataloader_num_workers=0, per_device_eval_batch_size=64)
    model = ImageModelArguments(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                patch_size=7)
    data = ImageDataArguments(classes=list(range(10)), max_train_samples=256, max_eval_samples=64)
    result = build_image_classification_trainer(model, data, stability, training).butterfly()
    assert {(r.spawn_step, r.child) for r in result.children} == {
        (t, k) for t in (0, 1, 4) for k in stability.children_at(t)}

    parent = load_file(run / "parent/final/model.safetensors")
    for t in (0, 1, 4):
        control = load_file(run / f"children/t{t}/c0/final/model.safetensors")
        assert all(torch.equal(parent[n], control[n]) for n in parent), t
        for k in stability.children_at(t)[1:]:
            record = json.loads((run / f"children/t{t}/c{k}/perturbation.json").read_text())
            first = json.loads((run / f"children/t{t}/c{k}/divergence.jsonl").read_text().splitlines()[0])
            assert first["step"] == t and first["l2"] == pytest.approx(record["change_l2"], rel=1e-5, abs=1e-7)
            if record["kind"] == "single_weight":
                assert record["entries_changed"] == 1 and len(record["tensors"][0]["deltas"]) == 1

    report = analyze_run(run, AnalyzeArguments(train_samples=32, batch_size=64, alphas=3, cpu=True))
    rows = {(row.spawn_step, row.group): row for row in report.summary}
    groups = ["gaussian 0.01", "gaussian 1", "single_weight 1"]
    assert set(rows) == {(t, g) for t in (0, 1, 4) for g in [*groups, "data_order reference"]} | {
        (0, "init_seed reference")}
    for (_, group), row in rows.items():
        assert row.num_children == (2 if group in groups else 1)
        assert row.control["loss_barrier_eval"] == 0.0  # the control is the parent, bitwise
    size = {g: rows[0, g].perturbation_size for g in groups}
    assert size["gaussian 1"] == pytest.approx(1.0, rel=0.05)
    assert size["gaussian 0.01"] == pytest.approx(0.01, rel=0.05)
    singles = [json.loads((run / f"children/t0/c{k}/perturbation.json").read_text()) for k in (5, 6)]
    assert size["single_weight 1"] == pytest.approx(  # one weight's |delta| = s_p over the L2 of an init
        sum(abs(r["tensors"][0]["deltas"][0]) / r["init_l2"] for r in singles) / 2)
    assert report.reference_rows("init_seed")[0].perturbation_size == pytest.approx(math.sqrt(2), rel=0.2)
    # the barriers come in both definitions, and the plot and the card section are drawn from them
    pair = report.perturbed(0)[0]
    assert pair.barriers["eval"]["loss"].gap_at_peak <= pair.barriers["eval"]["loss"].barrier + 1e-12
    files = write_report(run)
    assert files.plots["barrier_vs_size.png"].stat().st_size > 20_000
    card = files.card.read_text()
    assert "## Barrier against perturbation size" in card
    for name in [*groups, "init_seed reference", "data_order reference"]:
        assert f"| {name} |" in card
    assert "References: 1 of another init seed" in card
