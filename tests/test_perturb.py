"""hf_stability.perturb: what changes, by how much, and that no global RNG moves."""

import math
import random

import numpy as np
import pytest
import torch
from helpers import tiny_bert, tweets

from hf_stability import (
    NoMatchingParametersError,
    PerturbationConfig,
    PerturbationConfigError,
    PerturbationRecord,
    perturb_model,
)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed_entries(before, model):
    return {n: int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()}


def test_gaussian_changes_only_selected_tensors_by_the_recorded_norm():
    model = tiny_bert()
    before = _params(model)
    config = PerturbationConfig(scale=0.05, include=[r"encoder\.layer\.0\."], exclude=[r"LayerNorm"])
    record = perturb_model(model, config, step=3, child=1)

    changed = _changed_entries(before, model)
    selected = set(record.tensor_names)
    assert selected and all("encoder.layer.0." in n and "LayerNorm" not in n for n in selected)
    for name, count in changed.items():
        if name in selected:
            assert count == before[name].numel()
        else:
            assert count == 0, name
    diff = math.sqrt(sum(float((p.detach().double() - before[n].double()).pow(2).sum())
                         for n, p in model.named_parameters()))
    assert diff == pytest.approx(record.change_l2, rel=1e-12)
    assert record.change_l2 == pytest.approx(record.noise_l2, rel=1e-6)
    assert record.entries_changed == sum(before[n].numel() for n in selected)


@pytest.mark.parametrize(
    "config",
    [
        PerturbationConfig(kind="gaussian", scale=0.1),
        PerturbationConfig(kind="gaussian", scale=0.1, num_entries=1),
        PerturbationConfig(kind="gaussian", scale=0.1, normalize=True, fraction=0.3),
        PerturbationConfig(kind="batch", scale=0.1, batch_size=4),
        PerturbationConfig(kind="dropout"),
    ],
    ids=["gaussian", "single-weight", "normalized-fraction", "batch", "dropout"],
)
def test_perturbation_leaves_global_rng_untouched(config):
    model = tiny_bert()
    train, _ = tweets()
    batch = {k: torch.tensor(train[:4][k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor(train[:4]["label"])
    model.train()
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    perturb_model(model, config, step=2, child=1, batch=batch)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[1]) if isinstance(a, np.ndarray))
    assert random.getstate() == states[2]
    assert model.training, "perturb_model must restore the training mode"


def test_global_rng_state_round_trips_and_its_key_tells_states_apart():
    from hf_stability.perturb.rng import global_rng_state, rng_state_key, set_global_rng_state

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state, key = global_rng_state(), rng_state_key(global_rng_state())
    draws = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    assert rng_state_key(global_rng_state()) == key  # the same state: the same key
    torch.rand(1)
    assert rng_state_key(global_rng_state()) != key  # one draw later: another key
    set_global_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], draws[0]) and again[1:] == draws[1:]


def test_same_seed_step_and_child_give_identical_noise_and_others_differ():
    config = PerturbationConfig(scale=0.1, seed=4)
    results = {}
    for key in [(5, 1), (5, 1), (5, 2), (6, 1)]:
        model = tiny_bert()
        perturb_model(model, config, step=key[0], child=key[1])
        results.setdefault(key, []).append(_params(model))
    first, again = results[(5, 1)]
    assert all(torch.equal(first[n], again[n]) for n in first)
    for other in ((5, 2), (6, 1)):
        assert any(not torch.equal(first[n], results[other][0][n]) for n in first)


def test_single_weight_perturbation_changes_exactly_one_entry():
    model = tiny_bert()
    before = _params(model)
    record = perturb_model(model, PerturbationConfig(scale=1.0, num_entries=1), step=0, child=3)
    changed = {n: c for n, c in _changed_entries(before, model).items() if c}
    assert sum(changed.values()) == 1 and record.entries_changed == 1
    (name,) = changed
    tensor_record = next(t for t in record.tensors if t.entries_changed == 1)
    assert tensor_record.name == name
    index = tensor_record.indices[0]
    delta = float(model.get_parameter(name).detach().view(-1)[index].double() - before[name].view(-1)[index].double())
    assert abs(delta) == pytest.approx(record.change_l2, rel=1e-12)


def test_fraction_perturbs_about_that_share_of_entries():
    model = tiny_bert()
    before = _params(model)
    record = perturb_model(model, PerturbationConfig(scale=0.1, fraction=0.25), step=1, child=1)
    changed = sum(_changed_entries(before, model).values())
    assert changed == record.entries_changed
    assert record.entries_changed / record.entries_total == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("sparse", [{}, {"fraction": 0.1}, {"num_entries": 50}])
def test_normalize_scales_noise_to_the_expected_init_l2(sparse):
    model = tiny_bert(initializer_range=0.03)
    record = perturb_model(model, PerturbationConfig(scale=0.2, normalize=True, **sparse), step=0, child=1)
    expected = 0.2 * math.sqrt(sum(t.scale**2 * t.entries_changed for t in record.tensors))
    assert record.expected_init_l2 == pytest.approx(expected, rel=1e-12)
    assert record.noise_l2 == pytest.approx(expected, rel=1e-9)


def test_scale_modes():
    model = tiny_bert(initializer_range=0.05)
    init = perturb_model(model, PerturbationConfig(scale=0.1, scale_mode="init"), step=0, child=1)
    assert {t.scale for t in init.tensors} == {0.05}
    model = tiny_bert()
    stds = {n: float(p.detach().double().std(correction=0)) for n, p in model.named_parameters()}
    param = perturb_model(model, PerturbationConfig(scale=0.1, scale_mode="param"), step=0, child=1)
    assert all(t.scale == pytest.approx(stds[t.name], rel=1e-12) for t in param.tensors)
    absolute = perturb_model(tiny_bert(), PerturbationConfig(scale=0.1, scale_mode="absolute"), step=0, child=1)
    assert {t.scale for t in absolute.tensors} == {1.0}
    # noise of a large tensor has the std it was asked for
    word = next(t for t in absolute.tensors if t.name.endswith("word_embeddings.weight"))
    assert word.noise_l2 / math.sqrt(word.entries_changed) == pytest.approx(0.1, rel=0.01)


def test_batch_perturbation_points_along_the_gradient_of_an_independent_batch():
    model = tiny_bert()
    model.eval()
    train, _ = tweets()
    batch = {k: torch.tensor(train[:8][k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor(train[:8]["label"])
    loss = model(**batch).loss
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    before = _params(model)
    record = perturb_model(model, PerturbationConfig(kind="batch", scale=0.1, scale_mode="absolute"), batch=batch)
    delta = torch.cat([(p.detach() - before[n]).flatten().double() for n, p in model.named_parameters()])
    grad = torch.cat([grads[n].flatten().double() for n, _ in model.named_parameters()])
    cosine = float(delta @ grad / (delta.norm() * grad.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-5)
    assert record.noise_l2 == pytest.approx(0.1 * math.sqrt(record.entries_changed), rel=1e-6)


def test_control_changes_nothing_bitwise():
    model = tiny_bert()
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.bias[0] = -0.0
    before = _params(model)
    record = perturb_model(model, PerturbationConfig(kind="gaussian", scale=0.0), step=4)
    after = _params(model)
    assert record.entries_changed == 0 and record.noise_l2 == 0.0
    for n in before:
        assert torch.equal(before[n], after[n])
        assert torch.equal(torch.signbit(before[n]), torch.signbit(after[n]))


@pytest.mark.parametrize("config", [
    PerturbationConfig(scale=0.1, scale_mode="param"),
    PerturbationConfig(scale=0.1, normalize=True, fraction=0.3, exclude=["LayerNorm"]),
    PerturbationConfig(scale=1.0, kind="single_weight"),
    PerturbationConfig(kind="batch", scale=0.1, batch_size=4),
], ids=["gaussian-param-scale", "normalized-fraction", "single-weight", "batch"])
def test_perturbing_into_a_slice_of_a_stack_does_what_perturbing_the_model_does(config):
    """``into=``: a child's slice of a stack of children is perturbed bit for bit as a copy of the
    model would be, with the same record, and the model itself is left as it is."""
    model = tiny_bert()
    train, _ = tweets()
    batch = {k: torch.tensor(train[:8][k]) for k in ("input_ids", "attention_mask", "token_type_ids", "label")}
    batch["labels"] = batch.pop("label")
    before = _params(model)
    names = [n for n, _ in model.named_parameters()]
    stack = {n: torch.stack([before[n]] * 3) for n in names}
    record = perturb_model(model, config, step=4, child=2, batch=batch, into={n: stack[n][1] for n in names})
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(stack[n][0], before[n]) and torch.equal(stack[n][2], before[n]) for n in names)
    expected = perturb_model(model, config, step=4, child=2, batch=batch)
    assert record == expected and record.entries_changed > 0
    assert all(torch.equal(stack[n][1], p.detach()) for n, p in model.named_parameters())


def test_perturbing_into_tensors_that_cannot_stand_for_the_parameters_is_refused():
    model = tiny_bert()
    names = [n for n, _ in model.named_parameters()]
    into = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PerturbationConfigError, match="for the selected parameter 'classifier.bias' .found none"):
        perturb_model(model, PerturbationConfig(scale=0.1), into={n: into[n] for n in names[:-1]})
    with pytest.raises(PerturbationConfigError, match=r"dtype torch.float32 .* \(found \(3,\) torch.float64\)"):
        perturb_model(model, PerturbationConfig(scale=0.1), into={**into, names[-1]: into[names[-1]].double()})
    with pytest.raises(PerturbationConfigError, match="kind='init_seed' rebuilds the model"):
        perturb_model(model, PerturbationConfig(kind="init_seed"), model_init=tiny_bert, into=into)


def test_record_round_trips_through_json(tmp_path):
    model = tiny_bert()
    record = perturb_model(model, PerturbationConfig(scale=0.1, num_entries=3), step=2, child=1)
    record.save(tmp_path / "perturbation.json")
    assert PerturbationRecord.load(tmp_path / "perturbation.json") == record


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "uniform"}, "Unknown perturbation kind"),
        ({"scale": -0.1}, "finite number >= 0"),
        ({"scale": float("nan")}, "finite number >= 0"),
        ({"scale_mode": "xavier"}, "Unknown scale_mode"),
        ({"fraction": 0.1, "num_entries": 3}, "either fraction or num_entries"),
        ({"fraction": 1.5}, "fraction must lie"),
        ({"num_entries": 0}, "num_entries must be >= 1"),
        ({"include": ["(unclosed"]}, "Invalid regular expression"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(PerturbationConfigError, match=message):
        PerturbationConfig(**kwargs)


def test_include_or_exclude_pattern_matching_nothing_is_refused_and_model_untouched():
    model = tiny_bert()
    before = _params(model)
    with pytest.raises(NoMatchingParametersError, match="match no parameter"):
        perturb_model(model, PerturbationConfig(scale=0.1, include=[r"^decoder\."]))
    with pytest.raises(NoMatchingParametersError, match=r"patterns \['classfier'\] .* match no parameter"):
        perturb_model(model, PerturbationConfig(scale=0.1, exclude=["classfier"]))  # a typo would spare nothing
    with pytest.raises(NoMatchingParametersError, match="remove every parameter"):
        perturb_model(model, PerturbationConfig(scale=0.1, include=["pooler"], exclude=["pooler"]))
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
