"""hf_stability.analysis: exact measures, 1 and 2 processes alike, clear errors."""

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import copy_run, free_port, study_trainer, tiny_bert, training_args, tweets
from torch import nn

from hf_stability import ArchitectureMismatchError, StabilityArguments
from hf_stability.analysis import (
    AnalyzeArguments,
    EvalData,
    Interpolator,
    analyze_run,
    barrier,
    disagreement,
    interpolate,
    l2_distance,
    layerwise_cka,
    linear_cka,
)
from hf_stability.analysis.noise_floor import compare_with_floor, within_floor
from hf_stability.analysis.schema import REPORT_SCHEMA_VERSION
from hf_stability.errors import AnalysisArgumentsError, AnalysisDataError, RunDirectoryError
from hf_stability.metrics import load_metric

SCRIPTS = Path(__file__).parent / "scripts"


def _toy_pair():
    """Two 2-hidden-unit ReLU nets computing the same function with their hidden units swapped:
    logits = (relu(x), relu(-x)). Halfway, every weight of the first layer is 0."""
    def net(w1, w2):
        model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor(w1))
            model[2].weight.copy_(torch.tensor(w2))
        return model

    a = net([[1.0], [-1.0]], [[1.0, 0.0], [0.0, 1.0]])
    b = net([[-1.0], [1.0]], [[0.0, 1.0], [1.0, 0.0]])
    data = [{"input": torch.tensor([2.0]), "labels": 0}, {"input": torch.tensor([-2.0]), "labels": 1}]
    return a, b, data


def test_barrier_of_a_toy_pair_matches_the_hand_computation():
    a, b, data = _toy_pair()
    loss = barrier(a, b, data, "loss", alphas=11)
    # margin along the path is 2 (1 - 2 alpha)^2 for both examples; CE = log(1 + exp(-margin))
    expected = [math.log1p(math.exp(-2 * (1 - 2 * t) ** 2)) for t in loss.alphas]
    assert loss.values == pytest.approx(expected, rel=1e-6)
    assert loss.barrier == pytest.approx(math.log(2) - math.log1p(math.exp(-2)), rel=1e-6)
    error = barrier(a, b, data, "error", alphas=11)
    assert error.endpoint_a == error.endpoint_b == 0.0
    assert error.barrier == 0.5  # at alpha = 0.5 both logits are 0 and argmax picks class 0
    accuracy = barrier(a, b, data, load_metric("accuracy"), alphas=11)
    assert accuracy.values == pytest.approx(error.values)


def test_both_barrier_definitions_the_largest_gap_and_the_gap_at_the_peak():
    from hf_stability.analysis.path_barriers import barrier_from_values, gap_at_peak

    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    values = [1.0, 1.9, 1.8, 2.2, 2.0]  # the line: 1.0, 1.25, 1.5, 1.75, 2.0
    assert barrier_from_values(alphas, values) == pytest.approx(0.65)  # the largest gap, at alpha 0.25
    assert gap_at_peak(alphas, values) == pytest.approx(0.45)  # at the highest point, alpha 0.75
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        curve = torch.rand(7, generator=g).tolist()
        points = [i / 6 for i in range(7)]
        assert gap_at_peak(points, curve) <= barrier_from_values(points, curve) + 1e-12
        level = [curve[0], *curve[1:-1], curve[0]]  # equal endpoints: the two agree
        assert gap_at_peak(points, level) == pytest.approx(barrier_from_values(points, level), abs=1e-12)
    # the analysis reports both, from the same path
    a, b, data = _toy_pair()
    loss = barrier(a, b, data, "loss", alphas=11)
    assert loss.gap_at_peak == pytest.approx(gap_at_peak(loss.alphas, loss.values), abs=0)


@pytest.fixture(scope="module")
def models_and_data():
    _, test = tweets()
    return tiny_bert(0), tiny_bert(1), EvalData(test, batch_size=16)


def test_barrier_of_a_model_with_itself_is_zero(models_and_data):
    a, _, data = models_and_data
    for metric in ("loss", "error"):
        assert barrier(a, a, data, metric).barrier == pytest.approx(0.0, abs=1e-12)


def test_barrier_is_symmetric(models_and_data):
    a, b, data = models_and_data
    ab, ba = barrier(a, b, data, "loss"), barrier(b, a, data, "loss")
    assert ab.barrier == pytest.approx(ba.barrier, rel=1e-5)
    assert ab.values == pytest.approx(ba.values[::-1], rel=1e-5)


def test_interpolation_is_exact_at_the_ends_and_linear_in_between(models_and_data):
    a, b, _ = models_and_data
    interpolator = Interpolator(a, b)
    for alpha, reference in ((0.0, a), (1.0, b)):
        model = interpolator.set_alpha(alpha)
        assert all(torch.equal(p, reference.get_parameter(n)) for n, p in model.named_parameters())
    middle = interpolate(a, b, 0.25)
    name = "bert.encoder.layer.1.output.dense.weight"
    expected = 0.75 * a.get_parameter(name) + 0.25 * b.get_parameter(name)
    assert torch.allclose(middle.get_parameter(name), expected, atol=1e-7)


def test_a_bf16_buffer_holds_the_fp32_path_rounded_once(models_and_data):
    a, b, _ = models_and_data
    interpolator = Interpolator(a, b, dtype=torch.bfloat16)
    assert a.get_parameter("classifier.weight").dtype == torch.float32  # the endpoints are untouched
    for alpha, reference in ((0.0, a), (1.0, b)):
        model = interpolator.set_alpha(alpha)
        assert all(torch.equal(p, reference.get_parameter(n).to(torch.bfloat16)) for n, p in model.named_parameters())
    model = interpolator.set_alpha(0.3)
    for name, p in model.named_parameters():
        expected = torch.lerp(a.get_parameter(name), b.get_parameter(name), 0.3).to(torch.bfloat16)
        assert p.dtype == torch.bfloat16 and torch.equal(p, expected), name


def _bf16_loss_in_fp32(model, data):
    """The mean float32 cross-entropy of a bf16 copy's logits over ``data`` (batch by batch)."""
    cast, total = copy.deepcopy(model).to(torch.bfloat16).eval(), 0.0
    with torch.no_grad():
        for i in range(data.num_batches):
            batch = data.batch(i)
            logits = cast(**{k: v for k, v in batch.items() if k != "labels"}).logits
            total += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).double()) * len(logits)
    return total / len(data)


def test_bf16_full_evaluates_the_bf16_weights_with_a_float32_loss(models_and_data, caplog):
    from hf_stability.analysis import Evaluator
    from hf_stability.analysis.arguments import Autocast

    a, b, data = models_and_data
    full = Autocast("bf16_full")
    evaluator = Evaluator(device="cpu", autocast_dtype=full.dtype, weights_dtype=full.weights_dtype, progress=False)
    plain = Evaluator(device="cpu", progress=False)
    ours, cast = evaluator.evaluate(a, data), plain.evaluate(copy.deepcopy(a).to(torch.bfloat16), data)
    assert a.get_parameter("classifier.weight").dtype == torch.float32  # evaluated on a cast copy
    assert (ours.wrong, ours.judged) == (cast.wrong, cast.judged)  # the bf16 model's predictions
    # the loss of the bf16 model's logits in float32, not the model's bf16-rounded loss
    assert ours.loss == pytest.approx(_bf16_loss_in_fp32(a, data), rel=1e-9) and ours.loss != cast.loss
    assert ours.loss != plain.evaluate(a, data).loss  # nor the fp32 model's
    # along the path: every point (the endpoints too) is the bf16-rounded fp32 interpolation
    found = barrier(a, b, data, "loss", alphas=3, evaluator=evaluator)
    assert found.values == pytest.approx([_bf16_loss_in_fp32(m, data) for m in (a, interpolate(a, b, 0.5), b)],
                                         rel=1e-9)

    class SmoothedBertForSequenceClassification(type(a)):  # its loss is not the plain cross-entropy
        def forward(self, **inputs):
            out = super().forward(**inputs)
            out.loss = out.loss * 1.1
            return out

    smoothed = SmoothedBertForSequenceClassification(a.config)
    smoothed.load_state_dict(a.state_dict())
    with caplog.at_level("WARNING", logger="hf_stability.analysis.evaluation"):
        own = evaluator.evaluate(smoothed, data)
    assert own.loss == pytest.approx(1.1 * cast.loss, rel=1e-2) and "the model's own loss" in caplog.text


def test_l2_equals_a_direct_torch_sum(models_and_data):
    a, b, _ = models_and_data
    result = l2_distance(a, b, per_layer=True)
    with torch.no_grad():
        direct = torch.sqrt(sum(((p.double() - b.get_parameter(n).double()) ** 2).sum()
                                for n, p in a.named_parameters()))
    assert result.l2 == pytest.approx(float(direct), rel=1e-12)
    assert math.sqrt(sum(v**2 for v in result.per_layer.values())) == pytest.approx(result.l2, rel=1e-12)
    assert set(result.per_layer) == {"bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler",
                                     "classifier"}
    norms = [math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in m.parameters())) for m in (a, b)]
    assert result.relative == pytest.approx(result.l2 / math.sqrt(norms[0] * norms[1]), rel=1e-12)


def _hsic_cka(x, y):
    """CKA through centred Gram matrices: an independent computation."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, m = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * m).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(m)))


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64)
    y = torch.randn(60, 8, generator=g, dtype=torch.float64) + x[:, :8]
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-10)
    assert linear_cka(x @ q, 2.0 * y) == pytest.approx(linear_cka(x, y), rel=1e-10)
    assert math.isnan(linear_cka(torch.ones(5, 3), torch.randn(5, 3, generator=g)))


def test_layerwise_cka_of_a_model_with_itself_is_one(models_and_data):
    a, b, data = models_and_data
    for pooling in ("mean", "all"):
        same = layerwise_cka(a, a, data, pooling)
        assert same.layers == ["embeddings", "layer.0", "layer.1"]
        assert same.cka == pytest.approx([1.0] * 3, abs=1e-9)
    other = layerwise_cka(a, b, data, "cls")
    assert math.isnan(other.cka[0])  # the [CLS] embedding is the same for every example
    assert all(0.0 <= v <= 1.0 for v in other.cka[1:])


def test_disagreement_counts_differing_argmax(models_and_data):
    a, b, data = models_and_data
    batches = [data.batch(i) for i in range(data.num_batches)]
    with torch.no_grad():
        differ = sum(
            int((a(**{k: v for k, v in x.items() if k != "labels"}).logits.argmax(-1)
                 != b(**{k: v for k, v in x.items() if k != "labels"}).logits.argmax(-1)).sum())
            for x in batches
        )
    assert disagreement(a, b, data) == differ / len(data)
    assert disagreement(a, a, data) == 0.0


def test_models_of_different_architectures_are_refused_naming_the_tensor(models_and_data):
    a, _, data = models_and_data
    wider = tiny_bert(0, intermediate_size=48)
    message = r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight.*\(64, 32\).*\(48, 32\)"
    with pytest.raises(ArchitectureMismatchError, match=message):
        l2_distance(a, wider)
    with pytest.raises(ArchitectureMismatchError, match="missing"):
        barrier(a, tiny_bert(0, num_hidden_layers=3), data)


def test_a_datasets_dataset_is_batched_as_its_examples_one_by_one():
    """A plain datasets.Dataset is read a batch slice at a time; the batches are those of its
    examples read one by one (padding collator, a selection, an uneven last batch), and a
    formatted or transformed dataset is still read example by example."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    from hf_stability.data import load_tokenizer

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (50,), generator=g).tolist()
    dataset = Dataset.from_dict({"input_ids": [torch.randint(1000, 2000, (n,), generator=g).tolist() for n in lengths],
                                 "attention_mask": [[1] * n for n in lengths],
                                 "labels": torch.randint(0, 3, (50,), generator=g).tolist()}).select(range(3, 50))
    one_by_one = [dataset[i] for i in range(len(dataset))]
    collate = DataCollatorWithPadding(load_tokenizer())
    for batch_size in (8, 47):
        sliced, listed = (EvalData(d, batch_size=batch_size, collate_fn=collate) for d in (dataset, one_by_one))
        for index in range(sliced.num_batches):
            ours, theirs = sliced.batch(index), listed.batch(index)
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    formatted = EvalData(dataset.with_format("torch", columns=["labels"]), batch_size=8)
    assert torch.equal(formatted.batch(1)["labels"], torch.tensor([e["labels"] for e in one_by_one[8:16]]))
    transformed = EvalData(dataset.with_transform(lambda b: {"labels": [y + 1 for y in b["labels"]]}), batch_size=8)
    assert transformed.batch(0)["labels"].tolist() == [e["labels"] + 1 for e in one_by_one[:8]]


def test_empty_or_unlabelled_data_is_refused(models_and_data):
    a, _, data = models_and_data
    with pytest.raises(AnalysisDataError, match="empty"):
        barrier(a, a, data.dataset.select([]))
    with pytest.raises(AnalysisDataError, match="no labels"):
        barrier(a, a, data.dataset.remove_columns("label"))


def test_analyze_run_writes_a_report_with_every_child_and_the_floor(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    report = analyze_run(run, AnalyzeArguments(train_samples=32, batch_size=16, pairs="all", cpu=True))
    saved = json.loads((run / "analysis" / "report.json").read_text())
    assert saved["schema_version"] == REPORT_SCHEMA_VERSION and saved["settings"]["eval_samples"] == 64
    assert saved["settings"]["alignment"]["method"] == "weight"
    assert saved["settings"]["alignment"]["architecture"].startswith("BertForSequenceClassification")
    kinds = [(p["spawn_step"], p["kind"], p["a"], p["b"]) for p in saved["pairs"]]
    assert (0, "parent-child", "parent", "t0/c0") in kinds and (4, "child-child", "t4/c1", "t4/c2") in kinds
    for pair in saved["pairs"]:
        aligned = pair["aligned"]
        assert aligned["method"] == "weight" and aligned["converged"]
        assert set(aligned["barriers"]) == {"eval", "train"} and set(aligned["barriers"]["eval"]) == {"loss", "error"}
        # alignment can only bring b closer to a
        assert aligned["l2"]["l2"] <= pair["l2"]["l2"] + 1e-9
        if pair["is_control"]:
            assert pair["l2"]["l2"] == 0.0 and pair["disagreement"] == 0.0 and pair["amplification"] is None
            assert pair["barriers"]["eval"]["loss"]["barrier"] == pytest.approx(0.0, abs=1e-12)
            assert aligned["units_moved"] == 0 and aligned["l2"]["l2"] == 0.0
            assert aligned["barriers"]["eval"]["loss"]["barrier"] == pytest.approx(0.0, abs=1e-12)
            assert pair["noise_floor"] is None
        elif pair["kind"] == "parent-child":
            assert pair["l2"]["l2"] > 0
            assert pair["amplification"] == pytest.approx(pair["l2"]["l2"] / pair["perturbation_l2"])
            # on a CPU the floor is exactly 0, so a child that moved is beyond it
            floor = pair["noise_floor"]
            assert floor["factor"] == 2.0
            assert floor["figures"]["l2"] == {"value": pair["l2"]["l2"], "floor": 0.0, "within": False}
            assert floor["indistinguishable"] is False
        else:
            assert pair["noise_floor"] is None
    summary = {row["spawn_step"]: row for row in saved["summary"]}
    assert summary[0]["num_children"] == 2 and summary[0]["control"]["l2"] == 0.0
    assert summary[0]["control"]["aligned_loss_barrier_eval"] == pytest.approx(0.0, abs=1e-12)
    assert summary[0]["children"]["aligned_l2"]["n"] == 2
    l2s = [p["l2"]["l2"] for p in saved["pairs"]
           if p["spawn_step"] == 0 and p["kind"] == "parent-child" and not p["is_control"]]
    assert summary[0]["children"]["l2"]["mean"] == pytest.approx(sum(l2s) / 2)
    assert report.to_dict()["summary"] == saved["summary"]  # the returned Report is what was written
    assert report.summary[0].children["l2"].mean == summary[0]["children"]["l2"]["mean"]
    assert all(row["indistinguishable_from_floor"] == 0 for row in saved["summary"])
    perturbation = {(d["spawn_step"], d["child"]): d["perturbation_l2"] for d in saved["divergence"]}
    assert perturbation[(0, 0)] == 0.0 and perturbation[(0, 1)] > 0
    # the wall time of each stage, beside the report
    timings = json.loads((run / "analysis" / "timings.json").read_text())
    assert timings["pairs_measured"] == len(saved["pairs"]) and timings["pairs_reused"] == 0
    stages = timings["stages"]
    assert {"read the run directory", "verify checksums", "load and collate data", "load models",
            "evaluate endpoints", "L2", "barriers", "aligned barriers", "alignment (weight matching)",
            "CKA and disagreement", "report"} <= set(stages)
    assert stages["barriers"]["calls"] == 2 * len(saved["pairs"])  # eval and train, per pair
    assert timings["slowest_stage"] == max(stages, key=lambda name: stages[name]["seconds"])
    assert 0 < sum(entry["seconds"] for entry in stages.values()) <= timings["analysis_s"]
    assert 0 < timings["before_analysis_s"] < timings["startup_s"]  # process start to the first model load (Linux)


def test_an_analysis_is_reused_until_its_arguments_or_models_change(analysed_study, tmp_path, caplog):
    run = copy_run(analysed_study, tmp_path)
    shutil.rmtree(run / "children" / "t4" / "c2")  # not trained yet
    args = AnalyzeArguments(train_samples=16, batch_size=16, alphas=3, alignment="none", cpu=True)
    first = analyze_run(run, args)
    path = run / "analysis" / "report.json"
    assert first.inputs["arguments"]["alphas"] == 3 and "reanalyze" not in first.inputs["arguments"]
    assert len(first.pairs) == 5
    written = path.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="hf_stability.analysis.runner"):
        assert analyze_run(run, args) == first and path.stat().st_mtime_ns == written  # reused, not rewritten
    assert "Measured 0 pair(s); reused 5" in caplog.text
    other = analyze_run(run, dataclasses.replace(args, alphas=4))  # other arguments: measured again
    assert other.settings.alphas == 4 and path.stat().st_mtime_ns > written
    written = path.stat().st_mtime_ns
    again = analyze_run(run, dataclasses.replace(args, alphas=4, reanalyze=True))
    assert again.pairs == other.pairs
    # the missing child trains: only its pair is measured, the others are reused
    study_trainer(run).butterfly()
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_stability.analysis.runner"):
        last = analyze_run(run, dataclasses.replace(args, alphas=4))
    assert "Measured 1 pair(s); reused 5" in caplog.text
    assert len(last.pairs) == 6 and [p for p in last.pairs if p.b != "t4/c2"] == other.pairs
    fresh = analyze_run(run, dataclasses.replace(args, alphas=4, reanalyze=True))
    assert fresh.pairs == last.pairs and fresh.summary == last.summary


def test_an_analysis_in_bf16_full_says_so_and_keeps_the_controls_at_zero(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    analyze_run(run, AnalyzeArguments(train_samples=0, batch_size=16, alphas=3, alignment="none", cpu=True,
                                      autocast="bf16_full"))
    saved = json.loads((run / "analysis" / "report.json").read_text())
    assert saved["settings"]["autocast"] == "bf16_full"
    assert saved["settings"]["head"]["loss"].endswith("in float32 from the bf16 model's logits where it agrees "
                                                      "with the model's own")
    controls = [p for p in saved["pairs"] if p["is_control"]]
    assert controls and all(p["barriers"]["eval"]["loss"]["barrier"] == 0.0 for p in controls)


def test_a_child_within_twice_the_floor_on_every_figure_is_indistinguishable_from_it():
    control = {"l2": 1.0, "loss_barrier_eval": 0.1, "error_barrier_eval": 0.0}
    close = compare_with_floor({"l2": 2.0, "loss_barrier_eval": 0.15, "error_barrier_eval": 0.0}, control)
    assert close["indistinguishable"] and all(f["within"] for f in close["figures"].values())
    far = compare_with_floor({"l2": 2.01, "loss_barrier_eval": 0.15, "error_barrier_eval": 0.0}, control)
    assert not far["indistinguishable"] and far["figures"]["l2"] == {"value": 2.01, "floor": 1.0, "within": False}
    # a figure that was not measured does not count; a negative (numerical) floor counts as 0
    partial = compare_with_floor({"l2": 1.5, "loss_barrier_eval": None, "error_barrier_eval": 0.0},
                                 {"l2": 1.0, "loss_barrier_eval": -1e-9, "error_barrier_eval": 0.0})
    assert partial["indistinguishable"] and partial["figures"]["loss_barrier_eval"]["within"] is None
    assert within_floor(1e-12, -1e-9) is False
    assert compare_with_floor({"l2": 1.0}, None) is None
    assert compare_with_floor({"l2": None}, {"l2": None})["indistinguishable"] is False


def test_analyze_run_records_activation_matching_or_no_alignment(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    report = analyze_run(run, AnalyzeArguments(train_samples=32, batch_size=16, alignment="activation",
                                               alignment_samples=24, cpu=True))
    alignment = report.settings.alignment
    assert (alignment.method, alignment.seed, alignment.samples) == ("activation", None, 24)
    for pair in report.pairs:
        assert pair.aligned.method == "activation" and pair.aligned.iterations is None
        if pair.is_control:  # identical models: every unit correlates best with itself
            assert pair.aligned.units_moved == 0
    plain = analyze_run(run, AnalyzeArguments(train_samples=0, batch_size=16, alignment="none", cpu=True))
    assert all(pair.aligned is None for pair in plain.pairs)
    assert "aligned_l2" not in plain.summary[0].children
    with pytest.raises(AnalysisArgumentsError, match="Unknown alignment 'greedy': choose one of auto, weight"):
        AnalyzeArguments(alignment="greedy")


def _floats(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _floats(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _floats(v, f"{path}[{i}]")
    elif isinstance(x, float):
        yield path, x


def test_two_processes_give_the_numbers_of_one(analysed_study, tmp_path):
    one = analyze_run(copy_run(analysed_study, tmp_path / "one"),
                      AnalyzeArguments(train_samples=48, batch_size=16, pairs="all", pooling="mean", cpu=True))
    copy = tmp_path / "run"
    shutil.copytree(analysed_study, copy)
    shutil.rmtree(copy / "analysis")  # (else the same arguments would reuse the report of one process)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(SCRIPTS / "analyze_two_processes.py"), str(copy)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((copy / "analysis" / "report.json").read_text())
    assert two["settings"]["num_processes"] == 2
    a, b = dict(_floats(one.to_dict()["pairs"])), dict(_floats(two["pairs"]))
    assert a.keys() == b.keys() and len(a) > 100 and any(".aligned.barriers" in key for key in a)
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_missing_or_corrupt_weights_give_a_clear_error(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    weights = run / "children" / "t4" / "c1" / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    remedy = r"Delete .*children/t4/c1 and run the study again: it trains that child alone again"
    truncated = r"has 1000 bytes, \d+ were written: the file was truncated .*"
    with pytest.raises(RunDirectoryError, match=truncated + remedy):
        analyze_run(run, AnalyzeArguments(train_samples=0, cpu=True))
    weights.unlink()
    with pytest.raises(RunDirectoryError, match=r"model\.safetensors is missing \(its run recorded it in .*" + remedy):
        analyze_run(run, AnalyzeArguments(train_samples=0, cpu=True))
    with pytest.raises(RunDirectoryError, match="not a run directory"):
        analyze_run(tmp_path / "nothing", AnalyzeArguments(cpu=True))


def test_analyze_command_prints_the_summary_and_the_report_path(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    command = [sys.executable, "-m", "hf_stability.cli", "analyze", str(run), "--train_samples", "16", "--cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss barrier" in result.stdout and "control" in result.stdout and " +- " in result.stdout
    assert f"Report: {run / 'analysis' / 'report.json'}" in result.stdout
    bad = subprocess.run(command[:5] + ["--pairs", "everything"], capture_output=True, text=True, timeout=600)
    # a choice is an enum: argparse's usage error names the choices
    assert bad.returncode == 2
    assert "invalid choice: 'everything' (choose from 'parent-child', 'child-child', 'all')" in bad.stderr


def test_measures_work_for_a_transformers_vit_on_fashion_mnist():
    import numpy as np
    from transformers import ViTConfig, ViTForImageClassification

    from hf_stability.data import load_fashion_mnist

    images = load_fashion_mnist(classes=[0, 1, 2, 3, 4], max_per_split=48)["test"]
    data = [
        {"pixel_values": torch.tensor(np.asarray(row["image"]), dtype=torch.float32).unsqueeze(0) / 255.0,
         "labels": row["label"]}
        for row in images
    ]
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    a = ViTForImageClassification(config)
    torch.manual_seed(1)
    b = ViTForImageClassification(config)
    assert barrier(a, a, data, "loss", batch_size=16).barrier == pytest.approx(0.0, abs=1e-12)
    ab = barrier(a, b, data, "error", batch_size=16)
    assert 0.0 <= ab.barrier <= 1.0 and len(ab.values) == 11
    same = layerwise_cka(a, a, data, "cls", batch_size=16)
    assert same.layers == ["embeddings", "layer.0", "layer.1"] and same.cka[1:] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert disagreement(a, a, data) == 0.0
    assert "vit.layers.0" in l2_distance(a, b, per_layer=True).per_layer


def test_a_run_that_pads_with_a_tokenizer_it_did_not_save_in_final_is_analysed(tmp_path):
    """The run keeps its padding collator's tokenizer in RUN/data/tokenizer, so the analyzer pads
    without the tokenizer files of final/ (shared runs often lack them); a run with neither gets a
    clear error."""
    from transformers import DataCollatorWithPadding

    from hf_stability import StabilityTrainer
    from hf_stability.data import load_tokenizer
    from hf_stability.data.text import load_tweet_sentiment

    tokenizer = load_tokenizer()
    texts = load_tweet_sentiment()["train"].select(range(48))
    encoded = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=24), batched=True,
                        remove_columns=["text"])
    out = tmp_path / "run"
    StabilityTrainer(model_init=lambda: tiny_bert(0), args=training_args(out, max_steps=3), train_dataset=encoded,
                     eval_dataset=encoded, data_collator=DataCollatorWithPadding(tokenizer),
                     stability_args=StabilityArguments(spawn_steps=[0], num_children=1)).butterfly()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "manifest.json"):
        (out / "parent" / "final" / name).unlink(missing_ok=True)  # as if saved without them (no manifest either)
    report = analyze_run(out, AnalyzeArguments(train_samples=0, alphas=3, alignment="none", cpu=True))
    assert report.settings.eval_samples == 48
    shutil.rmtree(out / "data" / "tokenizer")  # a run of an earlier version
    (out / "data" / "manifest.json").unlink()
    with pytest.raises(RunDirectoryError, match=r"pads its batches, but .*final holds no tokenizer.*collate_fn="):
        analyze_run(out, AnalyzeArguments(train_samples=0, alphas=3, alignment="none", cpu=True, reanalyze=True))


def test_a_transformers_vit_in_bf16_full_is_the_bf16_model_on_bf16_pixels():
    from transformers import ViTConfig, ViTForImageClassification

    from hf_stability.analysis import Evaluator

    g = torch.Generator().manual_seed(0)
    data = EvalData([{"pixel_values": torch.rand(1, 28, 28, generator=g), "labels": i % 5} for i in range(40)],
                    batch_size=16)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    evaluator = Evaluator(device="cpu", autocast_dtype=torch.bfloat16, weights_dtype=torch.bfloat16, progress=False)
    plain = Evaluator(device="cpu", progress=False)
    ours, cast = evaluator.evaluate(model, data), plain.evaluate(copy.deepcopy(model).to(torch.bfloat16), data)
    # the model casts its pixels itself, so casting them first changes nothing: the same predictions
    assert (ours.wrong, ours.judged) == (cast.wrong, cast.judged)
    assert ours.loss == pytest.approx(cast.loss, rel=2.0**-7)  # the float32 loss, within bf16 rounding of its own
