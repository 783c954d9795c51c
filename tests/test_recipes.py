"""CPU smoke tests of the recipes at tiny sizes: each runs as a user runs it (a subprocess; the
text recipe through accelerate launch) and leaves a complete, analysed run directory."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TINY_TRAINING = ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--save_strategy", "no",
                 "--report_to", "none", "--logging_steps", "2", "--disable_tqdm", "true", "--learning_rate", "1e-3"]
TINY_ANALYSIS = ["--alphas", "3", "--analysis_train_subset", "16"]
TINY_VIT = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
            "--intermediate_size", "64", "--patch_size", "7"]


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def _check_study(run_dir: Path) -> dict:
    """The run is analysed and reported; the control ends where the parent ends (CPU: bitwise),
    and weight matching never moves a child away from its parent."""
    report = json.loads((run_dir / "analysis" / "report.json").read_text())
    assert (run_dir / "analysis" / "README.md").is_file()
    assert (run_dir / "analysis" / "plots" / "barrier_vs_spawn_step.png").is_file()
    pairs = [p for p in report["pairs"] if p["kind"] == "parent-child"]
    assert {p["is_control"] for p in pairs} == {True, False}
    for pair in pairs:
        l2 = pair["l2"]["l2"]
        if pair["is_control"]:
            assert l2 == 0.0
        elif pair.get("aligned"):  # (a PEFT study aligns its merged models: against their own L2)
            unaligned = (pair.get("merged_l2") or pair["l2"])["l2"]
            assert l2 > 0 and pair["aligned"]["l2"]["l2"] <= unaligned * (1 + 1e-9)
    return report


def test_text_recipe_under_accelerate_launch(tmp_path):
    run_dir = tmp_path / "text"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "accelerate" / "cpu.yaml"),
          str(RECIPES / "butterfly_text_classification.py"), "--output_dir", str(run_dir), "--max_train_samples", "48",
          "--max_eval_samples", "32", "--max_length", "24", "--max_steps", "4", "--spawn_steps", "0", "2",
          "--num_children", "1", "--divergence_every", "2", *TINY_TRAINING, *TINY_ANALYSIS])
    report = _check_study(run_dir)
    assert report["run"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_pretrain_vit_then_fine_tune_it_in_the_image_recipe(tmp_path):
    pretrained = tmp_path / "pretrained"
    _run([sys.executable, str(RECIPES / "pretrain_vit.py"), "--output_dir", str(pretrained), "--classes", "5", "6",
          "7", "8", "9", "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "4", *TINY_VIT,
          *TINY_TRAINING])
    assert (pretrained / "model.safetensors").is_file() and (pretrained / "eval_results.json").is_file()
    run_dir = tmp_path / "finetune"
    _run([sys.executable, str(RECIPES / "butterfly_image_classification.py"), "--model_name_or_path", str(pretrained),
          "--output_dir", str(run_dir), "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "4",
          "--spawn_steps", "0", "2", "--num_children", "1", "--divergence_every", "2", *TINY_TRAINING, *TINY_ANALYSIS])
    _check_study(run_dir)
    # the study starts from the pretrained weights (as from_pretrained names them); only the head is new
    from transformers import AutoModelForImageClassification

    source = dict(AutoModelForImageClassification.from_pretrained(str(pretrained)).named_parameters())
    start = load_file(str(run_dir / "parent" / "initial" / "model.safetensors"))
    assert start.keys() == source.keys()
    body = [n for n in source if not n.startswith("classifier.")]
    assert all(source[n].detach().equal(start[n]) for n in body)
    assert not source["classifier.weight"].detach().equal(start["classifier.weight"])


TINY_LLAMA = ["--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--num_key_value_heads", "2", "--intermediate_size", "48"]


def test_pretrain_a_small_llama_then_fine_tune_it_with_lora_and_fully(tmp_path):
    pretrained = tmp_path / "pretrained"
    _run([sys.executable, str(RECIPES / "pretrain_causal_lm.py"), "--output_dir", str(pretrained),
          "--max_train_samples", "64", "--max_eval_samples", "32", "--max_length", "24", "--max_steps", "4",
          *TINY_LLAMA, *TINY_TRAINING])
    metrics = json.loads((pretrained / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert (pretrained / "model.safetensors").is_file() and (pretrained / "tokenizer.json").is_file()
    source = load_file(str(pretrained / "model.safetensors"))
    study = [sys.executable, str(RECIPES / "butterfly_causal_lm.py"), "--model_name_or_path", str(pretrained),
             "--max_train_samples", "48", "--max_eval_samples", "32", "--max_length", "32", "--max_steps", "4",
             "--spawn_steps", "0", "2", "--num_children", "1", "--divergence_every", "2", *TINY_TRAINING,
             *TINY_ANALYSIS]
    for peft in ("lora", "none"):
        run_dir = tmp_path / peft
        out = _run([*study, "--peft", peft, "--output_dir", str(run_dir)])
        # the study's table shows the eval loss: a language model has no eval_accuracy
        assert re.search(r"final L2 to parent\s+amplification\s+eval_loss", out)
        report = _check_study(run_dir)
        assert report["run"]["task"] == "text-generation" and report["run"]["base_model"] is None  # (a local model)
        assert report["settings"]["head"]["name"] == "causal language model"
        assert (report["settings"]["peft"] is not None) is (peft == "lora")
        for pair in report["pairs"]:  # the answer's tokens are measured: perplexity is exp(loss) along the path
            loss, perplexity = pair["barriers"]["eval"]["loss"], pair["barriers"]["eval"]["perplexity"]
            assert perplexity["values"] == pytest.approx([math.exp(v) for v in loss["values"]])
        # the study starts from the pretrained weights: LoRA's frozen base, or every weight of the full study
        start = load_file(str(run_dir / ("base_model" if peft == "lora" else "parent/initial") / "model.safetensors"))
        assert start.keys() == source.keys() and all(start[n].equal(source[n]) for n in source)
    # completion-only: the prompt's tokens are labelled -100, the answer's and the end token are learnt
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
    example = load_from_disk(str(tmp_path / "none" / "data" / "eval"))[0]
    learnt = [t for t, y in zip(example["input_ids"], example["labels"]) if y != -100]
    assert tokenizer.decode(learnt) in ("negative [SEP]", "neutral [SEP]", "positive [SEP]")


def test_image_recipe_with_a_timm_vit(tmp_path):
    pytest.importorskip("timm")
    run_dir = tmp_path / "timm"
    _run([sys.executable, str(RECIPES / "butterfly_image_classification.py"), "--model_type", "timm", "--output_dir",
          str(run_dir), "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "4", "--spawn_steps",
          "0", "2", "--num_children", "1", "--divergence_every", "2", *TINY_VIT, *TINY_TRAINING, *TINY_ANALYSIS])
    report = _check_study(run_dir)
    assert report["settings"]["alignment"]["architecture"] == "TimmWrapper(timm VisionTransformer)"
    config = json.loads((run_dir / "parent" / "final" / "config.json").read_text())
    assert config["architectures"] == ["TimmWrapperForImageClassification"]


def test_a_sweep_of_sizes_and_references_is_one_command_and_one_run(tmp_path):
    root = tmp_path / "sweep"
    command = [sys.executable, str(RECIPES / "butterfly_text_classification.py"), "--output_dir", str(root),
               "--perturbation_scales", "0.01", "0.1", "--reference_children", "1", "--max_train_samples", "48",
               "--max_eval_samples", "32", "--max_length", "24", "--max_steps", "3", "--spawn_steps", "0", "1",
               "--num_children", "1", "--divergence_every", "0", "--alignment", "none", "--alphas", "3",
               "--analysis_train_subset", "0", *TINY_TRAINING]
    _run(command)
    report_file = root / "analysis" / "report.json"
    report = json.loads(report_file.read_text())
    rows = {(r["spawn_step"], r["group"]): r for r in report["summary"]}
    assert set(rows) == {(t, g) for t in (0, 1) for g in ("gaussian 0.01", "gaussian 0.1", "data_order reference")} \
        | {(0, "init_seed reference")}
    assert all(r["control"]["l2"] == 0.0 and r["num_children"] == 1 for r in rows.values())
    # a larger perturbation lands farther from the parent
    for t in (0, 1):
        small, large = rows[t, "gaussian 0.01"]["children"]["l2"]["mean"], rows[t, "gaussian 0.1"]["children"]["l2"]
        assert math.isfinite(large["mean"]) and large["mean"] > small
    assert (root / "analysis" / "plots" / "barrier_vs_size.png").stat().st_size > 10_000
    # the same command again trains nothing and measures nothing; reanalyze measures again
    written = report_file.stat().st_mtime_ns
    assert "Measured 0 pair(s); reused 9 of the earlier report" in _run(command)
    assert report_file.stat().st_mtime_ns == written
    from hf_stability.studies.recipe import RecipeAnalysisArguments, analyze_and_report

    again = RecipeAnalysisArguments(alignment="none", alphas=3, analysis_train_subset=0, reanalyze=True)
    analyze_and_report(root, again)
    assert report_file.stat().st_mtime_ns > written


@pytest.mark.parametrize("script, config", [
    ("butterfly_text_classification.py", "minilm_tweets.json"),
    ("butterfly_text_classification.py", "minilm_tweets_sweep.json"),
    ("butterfly_text_classification.py", "minilm_tweets_lora.json"),
    ("butterfly_image_classification.py", "vit_fmnist_from_scratch.json"),
    ("pretrain_vit.py", "vit_fmnist_pretrain.json"),
    ("butterfly_image_classification.py", "vit_fmnist_finetune.json"),
    ("pretrain_causal_lm.py", "llama_pretrain_text.json"),
    ("butterfly_causal_lm.py", "llama_tweets_lora.json"),
    ("butterfly_causal_lm.py", "llama_tweets_full.json"),
])
def test_every_key_of_a_recipe_config_is_a_field_of_its_recipe_and_parses(script, config):
    """Each key names a field of one of the recipe's argument dataclasses, and every dataclass takes
    its keys' values (TrainingArguments without the precision flags, which a CPU refuses)."""
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), RECIPES / script)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # (dataclasses resolve a module's annotations through sys.modules)
    try:
        spec.loader.exec_module(recipe)
    finally:
        del sys.modules[spec.name]
    values = json.loads((RECIPES / "configs" / config).read_text())
    owners = {f.name: cls for cls in recipe.ARGUMENTS for f in dataclasses.fields(cls) if f.init}
    assert not sorted(set(values) - set(owners)), f"{config}: keys that are no option of {script}"
    for cls in recipe.ARGUMENTS:
        mine = {k: v for k, v in values.items() if owners[k] is cls}
        if cls.__name__ == "TrainingArguments":
            mine = {k: v for k, v in mine.items() if k not in ("bf16", "fp16", "tf32")}
            mine.setdefault("output_dir", "unused")
        parsed = cls(**mine)
        if cls.__module__.startswith("hf_stability"):  # ours keep a value as given
            for key, value in mine.items():  # (an enum member equals its string)
                assert getattr(parsed, key) == value, (config, key)


def test_a_config_file_with_flags_after_it_and_a_random_init_text_model(tmp_path):
    run_dir = tmp_path / "text"
    config = tmp_path / "study.json"
    config.write_text(json.dumps({"output_dir": str(run_dir), "max_train_samples": 48, "max_eval_samples": 32,
                                  "max_length": 24, "max_steps": 6, "spawn_steps": [0, 2], "num_children": 1,
                                  "divergence_every": 2, "analyze": False, "random_init": True}))
    _run([sys.executable, str(RECIPES / "butterfly_text_classification.py"), str(config), "--max_steps", "4",
          *TINY_TRAINING])
    saved = json.loads((run_dir / "stability_config.json").read_text())
    assert saved["max_steps"] == 4 and saved["spawn_steps"] == [0, 2]  # the flag overrides the file; the rest stays
    assert saved["stability_arguments"]["base_model"] is None
    # random initialisation: not MiniLM's pretrained weights
    from hf_stability.data import minilm_path

    pretrained = load_file(str(minilm_path() / "model.safetensors"))
    start = load_file(str(run_dir / "parent" / "initial" / "model.safetensors"))
    ours, theirs = start["bert.embeddings.word_embeddings.weight"], pretrained["embeddings.word_embeddings.weight"]
    assert ours.shape == theirs.shape and not ours.equal(theirs)
    assert not (run_dir / "analysis").exists()


def test_config_files_that_cannot_be_read_are_refused_with_what_to_do(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    from hf_stability import StabilityArguments
    from hf_stability.errors import HfStabilityError
    from hf_stability.studies.recipe import parse_args

    parser = HfArgumentParser((StabilityArguments, TrainingArguments))
    with pytest.raises(HfStabilityError, match=r"does not exist: give the path of a JSON or YAML file"):
        parse_args(parser, [str(tmp_path / "missing.json"), "--num_children", "2"])
    config = tmp_path / "typo.yaml"
    config.write_text("output_dir: runs/x\nnum_childs: 3\n")
    with pytest.raises(HfStabilityError, match=r"no option of this recipe: \['num_childs'\]"):
        parse_args(parser, [str(config), "--seed", "1"])
    with pytest.raises(HfStabilityError, match=r"no option of this recipe: \['num_childs'\]"):
        parse_args(parser, [str(config)])  # the same message without flags after the file
    broken = tmp_path / "broken.json"
    broken.write_text('{"output_dir": "runs/x",')
    with pytest.raises(HfStabilityError, match=r"broken.json cannot be read .*fix its syntax"):
        parse_args(parser, [str(broken)])
    config.write_text("output_dir: runs/x\nnum_children: 3\nseed: 5\n")
    stability, training = parse_args(parser, [str(config), "--seed", "1"])
    assert stability.num_children == 3 and training.seed == 1 and training.output_dir == "runs/x"
