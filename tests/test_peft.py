"""PEFT adapters end to end: studies of LoRA and IA3 models train children from adapter
checkpoints, the control is its parent, the perturbation touches what trains, and the analysis
measures the adapters and the merged models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import peft_bert, tiny_bert, tiny_trainer, training_args, tweets
from safetensors.torch import load_file

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.analysis import AnalyzeArguments, analyze_run
from hf_stability.errors import HfStabilityError, StudyArgumentsError
from hf_stability.perturb import PerturbationConfig, init_scales, perturb_model
from hf_stability.run_directory import RunDirectory

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
STABILITY = dict(spawn_steps=[0, 4], num_children=2, perturbation_scale=0.5, divergence_every=4)
TRAINING = dict(max_steps=8, learning_rate=3e-3, save_strategy="steps", save_steps=4)
ANALYSIS = dict(train_samples=32, batch_size=16, alphas=5, cpu=True)


def _l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def _merged(run: RunDirectory, final: Path) -> dict[str, torch.Tensor]:
    """Base + adapter merged by peft itself, from the files (not through the analyzer)."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(str(run.base_model_dir))
    merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    return {n: p.detach() for n, p in merged.named_parameters()}


@pytest.fixture(scope="module", params=["lora", "ia3"])
def peft_study(request, tmp_path_factory):
    """A finished and analysed study of the tiny BERT with a LoRA or an IA3 adapter."""
    out = tmp_path_factory.mktemp(f"peft-{request.param}")
    trainer = tiny_trainer(out, StabilityArguments(**STABILITY), model_init=lambda: peft_bert(request.param),
                           **TRAINING)
    result = trainer.butterfly()
    report = analyze_run(out, AnalyzeArguments(**ANALYSIS))
    return request.param, RunDirectory(result.run_dir), report


def test_a_peft_study_saves_adapters_and_its_control_is_bitwise_its_parent(peft_study):
    adapter, run, _ = peft_study
    parent = load_file(str(run.parent_final / "adapter_model.safetensors"))
    assert not (run.parent_final / "model.safetensors").exists()
    # every child started from an adapter checkpoint of the parent, and the control ends where the parent does
    assert (run.parent_checkpoint(4) / "adapter_model.safetensors").is_file()
    for t in (0, 4):
        control = load_file(str(run.child_final(t, 0) / "adapter_model.safetensors"))
        assert control.keys() == parent.keys() and all(torch.equal(control[k], parent[k]) for k in parent)
        child = load_file(str(run.child_final(t, 1) / "adapter_model.safetensors"))
        assert _l2(child, parent) > 0
    # the base model the adapters sit on is saved once, and is the model the study started from
    base = load_file(str(run.base_model_dir / "model.safetensors"))
    fresh = tiny_bert(0).state_dict()
    body = [k for k in base if not k.startswith("classifier.")]
    assert body and all(torch.equal(base[k], fresh[k]) for k in body)
    assert (run.base_model_dir / "manifest.json").is_file()


def test_the_default_perturbation_of_a_peft_model_touches_only_the_adapter(peft_study):
    adapter, run, _ = peft_study
    record = json.loads(run.perturbation_file(0, 1).read_text())
    names = [t["name"] for t in record["tensors"]]
    marker = "lora_" if adapter == "lora" else "ia3_l"
    assert names and all(marker in n or "modules_to_save" in n for n in names)
    assert any(marker in n for n in names)
    assert "Only trainable parameters were perturbed" in record["note"]


def test_peft_analysis_measures_the_adapters_and_the_merged_models(peft_study):
    adapter, run, report = peft_study
    assert report.settings.peft.adapter == adapter.upper() and report.settings.peft.path == "adapters"
    parent = load_file(str(run.parent_final / "adapter_model.safetensors"))
    merged_parent = _merged(run, run.parent_final)
    for pair in (p for p in report.pairs if p.kind == "parent-child"):
        t, k = pair.spawn_step, pair.child
        child = load_file(str(run.child_final(t, k) / "adapter_model.safetensors"))
        assert pair.l2.l2 == pytest.approx(_l2(parent, child), rel=1e-9, abs=1e-12)
        assert pair.merged_l2.l2 == pytest.approx(_l2(merged_parent, _merged(run, run.child_final(t, k))),
                                                  rel=1e-6, abs=1e-9)
        # the far endpoint of the path is the child itself: its loss is the one its Trainer evaluated
        eval_loss = json.loads((run.child_final(t, k) / "eval_results.json").read_text())["eval_loss"]
        assert pair.barriers["eval"]["loss"].endpoint_b == pytest.approx(eval_loss, rel=1e-5)
        if pair.is_control:
            assert pair.l2.l2 == 0.0 and pair.merged_l2.l2 == 0.0 and pair.disagreement == 0.0
        else:
            assert pair.merged_l2.l2 > 0
        # alignment and CKA read the merged model
        assert pair.aligned is not None and pair.aligned.l2.l2 <= pair.merged_l2.l2 * (1 + 1e-9)
        assert pair.cka.values[-1] is not None
    assert report.settings.alignment.architecture.startswith("BertForSequenceClassification")
    # the summary holds the merged L2 beside the adapters' (the aligned L2 is the merged models'), and
    # the table says which is which
    for row in (r for r in report.summary if r.children):
        assert row.children["merged_l2"].mean >= row.children["aligned_l2"].mean * (1 - 1e-9)
    from hf_stability.report.table import summary_table

    header = summary_table(report).splitlines()[0]
    assert "L2 to parent (adapter)" in header and "L2 merged" in header and "L2 aligned (merged)" in header


def test_barriers_along_the_merged_path_share_the_endpoints_of_the_adapter_path(peft_study, tmp_path):
    import shutil

    adapter, run, report = peft_study
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    merged = analyze_run(copy, AnalyzeArguments(**ANALYSIS, peft_path="merged", alignment="none"))
    assert merged.settings.peft.path == "merged"
    by_name = {p.b: p for p in report.pairs}
    interior = []
    for pair in (p for p in merged.pairs if not p.is_control):
        line, other = pair.barriers["eval"]["loss"], by_name[pair.b].barriers["eval"]["loss"]
        assert line.endpoint_a == pytest.approx(other.endpoint_a, rel=1e-5)
        assert line.endpoint_b == pytest.approx(other.endpoint_b, rel=1e-5)
        interior.append(abs(line.values[2] - other.values[2]))
    if adapter == "lora":  # B A is not linear in (A, B): the two lines differ between their ends
        assert max(interior) > 1e-7


def test_init_scales_of_adapters_are_their_own_initialisers():
    lora = peft_bert("lora")
    names = [n for n, _ in lora.named_parameters() if ".lora_" in n]
    scales = init_scales(lora, names)
    for name in names:
        if ".lora_A." in name:
            drawn = dict(lora.named_parameters())[name].detach().std().item()
            assert scales[name] == pytest.approx(drawn, rel=0.1)  # kaiming-uniform: 1 / sqrt(3 fan_in)
            # B starts at zero: its scale is its A's, so init-scale noise moves both factors alike
            assert scales[name.replace(".lora_A.", ".lora_B.")] == scales[name]
    from peft import LoraConfig, get_peft_model

    gaussian = get_peft_model(tiny_bert(0), LoraConfig(r=8, target_modules=["query"], init_lora_weights="gaussian",
                                                       task_type="SEQ_CLS"))
    name = next(n for n, _ in gaussian.named_parameters() if ".lora_A." in n)
    drawn = dict(gaussian.named_parameters())[name].detach().std().item()
    assert init_scales(gaussian, [name])[name] == pytest.approx(drawn, rel=0.15)  # N(0, 1/r)
    ia3 = peft_bert("ia3")
    vectors = [n for n, _ in ia3.named_parameters() if ".ia3_l." in n]
    assert vectors and set(init_scales(ia3, vectors).values()) == {1.0}  # they start at 1


def test_frozen_weights_are_left_alone_unless_asked():
    model = tiny_bert(0)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = perturb_model(model, PerturbationConfig(scale=0.5), step=0, child=1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "embeddings" in n)
    assert not any("embeddings" in name for name in record.tensor_names)
    assert "frozen tensors were left as they are" in record.note
    record = perturb_model(model, PerturbationConfig(scale=0.5, trainable_only=False), step=0, child=1)
    assert any("embeddings" in name for name in record.tensor_names) and record.note is None


def test_perturbing_frozen_base_weights_of_a_peft_model_is_refused_before_training(tmp_path):
    with pytest.raises(HfStabilityError, match=r"perturbation_trainable_only=False with a PEFT model: .* lost at the "
                                               r"child's first checkpoint"):
        tiny_trainer(tmp_path / "run", StabilityArguments(**STABILITY, perturbation_trainable_only=False),
                     model_init=lambda: peft_bert("lora"), **TRAINING).butterfly()
    assert not (tmp_path / "run" / "parent").exists()


def test_stacked_peft_children_end_as_sequential_ones(tmp_path):
    train, test = tweets()
    finals = {}
    for parallel in (1, 2):
        out = tmp_path / f"p{parallel}"
        StabilityTrainer(model_init=lambda: peft_bert("lora"), args=training_args(out, **TRAINING), train_dataset=train,
                         eval_dataset=test, stability_args=StabilityArguments(**STABILITY, parallel_children=parallel)
                         ).butterfly()
        finals[parallel] = {(t, k): load_file(str(RunDirectory(out).child_final(t, k) / "adapter_model.safetensors"))
                            for t in (0, 4) for k in (0, 1, 2)}
    for key, alone in finals[1].items():
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in alone.values()))
        assert _l2(alone, finals[2][key]) < 1e-6 * norm, key


def test_a_lora_study_through_the_text_recipe(tmp_path):
    run_dir = tmp_path / "lora"
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "butterfly_text_classification.py"), "--output_dir", str(run_dir),
         "--peft", "lora", "--lora_r", "4", "--max_train_samples", "48", "--max_eval_samples", "32", "--max_length",
         "24", "--max_steps", "4", "--spawn_steps", "0", "2", "--num_children", "1", "--divergence_every", "2",
         "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm",
         "true", "--learning_rate", "1e-3", "--alphas", "3", "--analysis_train_subset", "16"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((run_dir / "analysis" / "report.json").read_text())
    assert report["settings"]["peft"] == {"adapter": "LORA", "path": "adapters"}
    adapter = json.loads((run_dir / "parent" / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["query", "value"]  # peft's BERT default
    control = next(p for p in report["pairs"] if p["is_control"])
    assert control["l2"]["l2"] == 0.0 and control["merged_l2"]["l2"] == 0.0
    assert "LoRA" in (run_dir / "analysis" / "README.md").read_text()


def test_an_ia3_study_through_the_cli_analysed_along_the_merged_path(tmp_path, capsys):
    from hf_stability.cli import main

    run_dir = tmp_path / "ia3"
    assert main(["train", "--output_dir", str(run_dir), "--peft", "ia3", "--max_train_samples", "48",
                 "--max_eval_samples", "32", "--max_length", "24", "--max_steps", "4", "--spawn_steps", "0",
                 "--num_children", "1", "--divergence_every", "2", "--per_device_train_batch_size", "8",
                 "--report_to", "none", "--disable_tqdm", "true", "--learning_rate", "1e-2", "--use_cpu",
                 "true"]) == 0
    assert main(["analyze", str(run_dir), "--peft_path", "merged", "--alphas", "3", "--train_samples", "0",
                 "--cpu", "true"]) == 0
    report = json.loads((run_dir / "analysis" / "report.json").read_text())
    assert report["settings"]["peft"] == {"adapter": "IA3", "path": "merged"}
    assert "c1" in capsys.readouterr().out


def test_adapter_arguments_refuse_what_peft_cannot_build():
    from hf_stability.studies.adapters import AdapterArguments

    with pytest.raises(StudyArgumentsError, match=r"Unknown peft 'prefix': choose one of none, lora, ia3"):
        AdapterArguments(peft="prefix")
    with pytest.raises(StudyArgumentsError, match=r"target_modules=\['query', 'value'\] \(--target_modules query"):
        AdapterArguments(peft="lora", target_modules=["no_such_module"]).wrap(tiny_bert(0), "SEQ_CLS")


def test_a_damaged_base_model_or_adapter_is_named_with_its_remedy(peft_study, tmp_path):
    import shutil

    from hf_stability.errors import RunDirectoryError

    adapter, run, report = peft_study
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    copied = RunDirectory(copy)
    weights = copied.base_model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:-100] = bytes(100)
    weights.write_bytes(bytes(data))
    with pytest.raises(RunDirectoryError, match=r"base_model/model\.safetensors does not match the checksum .*"
                                                r"Delete .*base_model and run the study again"):
        analyze_run(copy, AnalyzeArguments(**ANALYSIS))
    # the remedy: the study saves the base again (training nothing) and the analysis comes back
    shutil.rmtree(copied.base_model_dir)
    finals = {p: p.stat().st_mtime_ns for p in copy.rglob("adapter_model.safetensors")}
    tiny_trainer(copy, StabilityArguments(**STABILITY), model_init=lambda: peft_bert(adapter), **TRAINING).butterfly()
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("adapter_model.safetensors")} == finals
    again = analyze_run(copy, AnalyzeArguments(**ANALYSIS))
    assert [p.l2.l2 for p in again.pairs] == [p.l2.l2 for p in report.pairs]
    # a child's adapter: that child's remedy
    (copied.child_final(4, 1) / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    with pytest.raises(RunDirectoryError, match=r"adapter_model\.safetensors has 1000 bytes.*Delete .*children/t4/c1"):
        analyze_run(copy, AnalyzeArguments(**ANALYSIS))


def test_an_adapter_config_is_the_same_whatever_order_peft_wrote_its_module_sets_in(tmp_path):
    """PEFT saves target_modules from a Python set: two processes write one adapter's config with
    the modules in two orders (a resumed LoRA study's report then differed from the uninterrupted
    one's). The analysis compares them as sets, and a real change still counts."""
    from hf_stability.analysis.inputs import model_config_fingerprint

    model = peft_bert("lora")
    model.save_pretrained(str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 2
    reordered = tmp_path / "b"
    reordered.mkdir()
    (reordered / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": config["target_modules"][::-1]}))
    assert model_config_fingerprint(tmp_path / "a", "") == model_config_fingerprint(reordered, "")
    other = tmp_path / "c"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query", "key"]}))
    assert model_config_fingerprint(other, "") != model_config_fingerprint(tmp_path / "a", "")
