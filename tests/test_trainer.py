"""StabilityTrainer: train() is the Trainer's, butterfly() writes a resumable run directory."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import model_state, tiny_bert, tiny_trainer, training_args, tweets
from safetensors.torch import load_file
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_stability import (
    HfStabilityError,
    NoMatchingParametersError,
    RunConfigMismatchError,
    SpawnStepError,
    StabilityArguments,
    StabilityMixin,
    StabilityTrainer,
)
from hf_stability.analysis import AnalyzeArguments, analyze_run
from hf_stability.errors import RunInUseError
from hf_stability.report import write_report
from hf_stability.studies.text_classification import (
    TextDataArguments,
    TextModelArguments,
    build_text_classification_trainer,
)
from hf_stability.training.callbacks import LOG_KEY

SCRIPTS = Path(__file__).parent / "scripts"


def _weights(path):
    """A final/'s tensors: the model's, or a PEFT study's adapter."""
    adapter = Path(path) / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else Path(path) / "model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_is_bitwise_the_plain_trainer(tmp_path):
    train, _ = tweets()
    plain = Trainer(model=tiny_bert(0), args=training_args(tmp_path / "a"), train_dataset=train)
    plain.train()
    ours = StabilityTrainer(model=tiny_bert(0), args=training_args(tmp_path / "b"), train_dataset=train)
    ours.train()
    assert _equal(model_state(plain.model), model_state(ours.model))


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory):
    """Two identical butterfly studies of the packaged MiniLM (pretrained BERT, seeded new head)."""
    runs = []
    for name in ("a", "b"):
        data = TextDataArguments(max_train_samples=64, max_eval_samples=32, max_length=24)
        stability = StabilityArguments(spawn_steps=[0, 2], num_children=1, divergence_every=2)
        training = training_args(tmp_path_factory.mktemp(name), max_steps=5, learning_rate=5e-5)
        runs.append(build_text_classification_trainer(TextModelArguments(), data, stability, training).butterfly())
    return runs


def test_minilm_control_child_ends_bitwise_equal_to_parent(minilm_runs):
    run = minilm_runs[0].run_dir
    parent = _weights(run / "parent" / "final")
    for t in (0, 2):
        assert _equal(parent, _weights(run / "children" / f"t{t}" / "c0" / "final")), f"control of step {t}"


def test_minilm_perturbed_child_ends_measurably_different(minilm_runs):
    result = minilm_runs[0]
    parent = _weights(result.run_dir / "parent" / "final")
    for t in (0, 2):
        child = _weights(result.run_dir / "children" / f"t{t}" / "c1" / "final")
        l2 = math.sqrt(sum(float((parent[k].double() - child[k].double()).pow(2).sum()) for k in parent))
        assert l2 > 1e-3
        row = next(r for r in result.children if r.spawn_step == t and r.child == 1)
        assert row.final_l2 == pytest.approx(l2, rel=1e-6)


def test_two_identical_butterfly_runs_give_identical_weights(minilm_runs):
    a, b = (r.run_dir for r in minilm_runs)
    finals = ["parent/final"] + [f"children/t{t}/c{k}/final" for t in (0, 2) for k in (0, 1)]
    for final in finals:
        assert _equal(_weights(a / final), _weights(b / final)), final


def test_run_directory_follows_the_contract(tmp_path):
    result = tiny_trainer(tmp_path).butterfly()
    run = result.run_dir
    config = json.loads((run / "stability_config.json").read_text())
    assert config["spawn_steps"] == [0, 5] and config["children"] == [0, 1, 2] and config["max_steps"] == 12
    assert {"torch", "transformers", "accelerate"} <= set(config["versions"])
    assert config["perturbations"]["t5"]["c0"]["kind"] == "none"
    assert (run / "parent" / "checkpoint-0" / "trainer_state.json").is_file()
    assert (run / "parent" / "checkpoint-5" / "optimizer.pt").is_file()
    # a finished study keeps the parent's snapshots at its spawn steps after 0 and its last step (for retraining)
    assert sorted(p.name for p in (run / "parent" / "trajectory").iterdir()) == ["step-12.safetensors",
                                                                                  "step-5.safetensors"]
    for t in (0, 5):
        for k in (0, 1, 2):
            child = run / "children" / f"t{t}" / f"c{k}"
            assert (child / "final" / "model.safetensors").is_file()
            assert not (child / "final" / "training_args.bin").exists()
            assert "eval_accuracy" in json.loads((child / "final" / "eval_results.json").read_text())
            record = json.loads((child / "perturbation.json").read_text())
            assert record["step"] == t and record["child"] == k
            assert (record["change_l2"] == 0) == (k == 0)
            assert not list(child.glob("checkpoint-*"))


def test_divergence_is_logged_every_n_steps_to_file_and_trainer_logs(tmp_path):
    trainer = tiny_trainer(tmp_path)
    result = trainer.butterfly()
    child = result.run_dir / "children" / "t5" / "c1"
    rows = [json.loads(line) for line in (child / "divergence.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 8, 12]
    record = json.loads((child / "perturbation.json").read_text())
    assert rows[0]["l2"] == pytest.approx(record["change_l2"], rel=1e-9)
    parent = _weights(result.run_dir / "parent" / "final")
    final = _weights(child / "final")
    l2 = math.sqrt(sum(float((parent[k].double() - final[k].double()).pow(2).sum()) for k in parent))
    assert rows[-1]["l2"] == pytest.approx(l2, rel=1e-9)
    # the last child's own Trainer logs carry the same numbers
    logged = [(h["step"], h[LOG_KEY]) for h in trainer.state.log_history if LOG_KEY in h]
    last = json.loads((result.run_dir / "children" / "t5" / "c2" / "divergence.jsonl").read_text().splitlines()[-1])
    assert logged[-1] == (12, pytest.approx(last["l2"], rel=1e-12))


SCHEDULE_FLAGS = {"linear": [], "constant": ["--constant"], "lora": ["--constant", "--lora"]}


def _run_script(out, *kill, schedule="linear"):
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "butterfly_run.py"), str(out), *SCHEDULE_FLAGS[schedule], *map(str, kill)],
        capture_output=True, text=True, timeout=600,
    )


def _all_finals(run):
    return ["parent/final"] + [f"children/t{t}/c{k}/final" for t in (0, 5) for k in (0, 1, 2)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted study of butterfly_run.py, per schedule ("linear" or "constant"), made once."""
    made = {}

    def run(schedule: str) -> Path:
        if schedule not in made:
            out = tmp_path_factory.mktemp(f"uninterrupted-{schedule}")
            finished = _run_script(out, schedule=schedule)
            assert finished.returncode == 0, finished.stderr[-3000:]
            made[schedule] = out
        return made[schedule]

    return run


KILL_POINTS = [
    ("linear", "parent", 2), ("linear", "parent", 7),     # during the parent (before and after a spawn checkpoint)
    ("linear", "children/t5/c0", "begin"),              # between children: t0's are complete, t5's not begun
    # during a child (with, without its own checkpoint)
    ("linear", "children/t0/c2", 6), ("linear", "children/t5/c1", 9),
    ("linear", "analysis", 5),                          # during the analysis
    ("linear", "report", "plots"),                      # during report writing: plots written, card not
    # After the last checkpoint (checkpoint-12) and before final/, with a learning rate that is not 0 at the end:
    # a resumed run must not take a 13th step.
    ("constant", "parent", "evaluate"),
    ("constant", "children/t5/c2", "evaluate"),         # a child trained alone
    ("constant", "children/t0/.stacked-0-1.tmp", "evaluate2"),  # a stacked group: one child finalised, the other not
    # a LoRA study resumes from adapter checkpoints: the parent, a child alone, a stacked group
    ("lora", "parent", 7), ("lora", "children/t5/c2", 9), ("lora", "children/t0/.stacked-0-1.tmp", 6),
]


@pytest.mark.slow
@pytest.mark.parametrize("kill", KILL_POINTS, ids=lambda k: f"{k[0]}-{k[1]}@{k[2]}")
def test_killed_study_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, kill):
    schedule, *point = kill
    reference = uninterrupted(schedule)
    killed = _run_script(tmp_path, *point, schedule=schedule)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # nothing partial is taken as complete: no report before the analysis ends, no card before the report does
    assert not (tmp_path / "analysis" / "README.md").exists()
    if point[0] != "report":
        assert not (tmp_path / "analysis" / "report.json").exists()
    done_before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("children/*/*/final/*model.safetensors")}
    resumed = _run_script(tmp_path, schedule=schedule)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for final in _all_finals(tmp_path):
        assert _equal(_weights(tmp_path / final), _weights(reference / final)), final
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was trained again"
    for name in ("divergence.jsonl", "perturbation.json"):
        for t, k in ((0, 1), (0, 2), (5, 1), (5, 2)):
            a = (tmp_path / f"children/t{t}/c{k}" / name).read_text()
            b = (reference / f"children/t{t}/c{k}" / name).read_text()
            assert a == b, name
    for name in ("report.json", "README.md"):
        assert (tmp_path / "analysis" / name).read_text() == (reference / "analysis" / name).read_text(), name
    plots = sorted(p.name for p in (tmp_path / "analysis" / "plots").iterdir())
    assert plots == sorted(p.name for p in (reference / "analysis" / "plots").iterdir())
    # no step past the last: no checkpoint-13, and the parent's checkpoints are the uninterrupted run's
    checkpoints = sorted(p.name for p in (tmp_path / "parent").glob("checkpoint-*"))
    assert checkpoints == sorted(p.name for p in (reference / "parent").glob("checkpoint-*"))
    assert not list(tmp_path.rglob("checkpoint-13"))
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"


@pytest.mark.slow
def test_a_second_process_on_a_run_directory_is_refused_naming_the_first(tmp_path, uninterrupted):
    holder = subprocess.Popen([sys.executable, str(SCRIPTS / "butterfly_run.py"), str(tmp_path), "pause", "3"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "paused"  # the parent is training, the run is locked
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        message = rf"in use by another hf_stability process \(pid {holder.pid}, `butterfly`.*wait for that one"
        with pytest.raises(RunInUseError, match=message) as refused:
            tiny_trainer(tmp_path, StabilityArguments(spawn_steps=[0, 5], num_children=2, divergence_every=4),
                         max_steps=12, save_strategy="steps", save_steps=4).butterfly()
        assert refused.value.pid == holder.pid
        with pytest.raises(RunInUseError, match=message):
            analyze_run(tmp_path, AnalyzeArguments(cpu=True))
        with pytest.raises(RunInUseError, match=message):
            write_report(tmp_path)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # the refused calls wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the lock went with its process (SIGKILL): the same study resumes and ends as if never stopped
    resumed = _run_script(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = uninterrupted("linear")
    for final in _all_finals(tmp_path):
        assert _equal(_weights(tmp_path / final), _weights(reference / final)), final


@pytest.mark.slow
@pytest.mark.parametrize("limit", [2_000_000, 6_000_000], ids=["own-write", "trainer-checkpoint"])
def test_a_full_disk_stops_the_study_clearly_and_it_resumes_after(tmp_path, uninterrupted, limit):
    """2 MB: hf_stability's own first write (the parent's initial weights, 4 MB) fails; 6 MB: the
    Trainer's first checkpoint (its optimizer state, 8 MB) fails."""
    failed = _run_script(tmp_path, "disk", limit)
    assert failed.returncode == 1, failed.stderr[-3000:]
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Writing ") and "the disk is full or failing (" in error, error
    assert "run the same command again" in error and "Traceback" not in failed.stderr
    assert not list(tmp_path.rglob("final")) and not list(tmp_path.rglob("*.tmp"))
    # nothing partial counts as complete: space back, the same command finishes as if never stopped
    resumed = _run_script(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = uninterrupted("linear")
    for final in _all_finals(tmp_path):
        assert _equal(_weights(tmp_path / final), _weights(reference / final)), final
    assert (tmp_path / "analysis" / "report.json").read_text() == (reference / "analysis" / "report.json").read_text()


def test_run_of_another_configuration_is_refused_unless_overwrite(tmp_path):
    tiny_trainer(tmp_path, max_steps=8).butterfly()
    other = StabilityArguments(spawn_steps=[0, 5], num_children=2, perturbation_scale=0.5)
    with pytest.raises(RunConfigMismatchError, match="perturbation_scale: 0.01 -> 0.5") as refused:
        tiny_trainer(tmp_path, other, max_steps=8).butterfly()
    assert "stability_arguments.perturbation_scale: 0.01 -> 0.5" in refused.value.differences
    saved = json.loads((tmp_path / "stability_config.json").read_text())
    assert saved["stability_arguments"]["perturbation_scale"] == 0.01
    other.overwrite_run = True
    result = tiny_trainer(tmp_path, other, max_steps=8).butterfly()
    saved = json.loads((result.run_dir / "stability_config.json").read_text())
    assert saved["stability_arguments"]["perturbation_scale"] == 0.5


def test_spawn_step_at_or_beyond_training_is_refused_before_writing(tmp_path):
    with pytest.raises(SpawnStepError, match=r"at or beyond the last training step \(12\)"):
        tiny_trainer(tmp_path / "run", StabilityArguments(spawn_steps=[3, 12])).butterfly()
    # the Trainer itself creates an empty output_dir; nothing of the study is written
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_include_pattern_matching_nothing_is_refused_before_training(tmp_path):
    stability = StabilityArguments(spawn_steps=[2], perturbation_include=[r"^decoder\."])
    with pytest.raises(NoMatchingParametersError, match="match no parameter"):
        tiny_trainer(tmp_path / "run", stability).butterfly()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize(
    "include, scale, step, reason",
    [(["word_embeddings"], 1e20, 5, "training loss is nan"),
     (["classifier"], 1e39, 4, "L2 distance to the parent is inf")],
    ids=["nan-loss", "inf-weights"],
)
def test_nan_child_is_marked_diverged_and_the_others_go_on(tmp_path, include, scale, step, reason):
    stability = StabilityArguments(
        spawn_steps=[4], num_children=2, perturbation_scale=scale, perturbation_scale_mode="absolute",
        perturbation_include=include,
    )
    result = tiny_trainer(tmp_path, stability).butterfly()
    status = {r.child: r.status for r in result.children}
    assert status == {0: "done", 1: "diverged", 2: "diverged"}
    diverged = json.loads((result.run_dir / "children" / "t4" / "c1" / "diverged.json").read_text())
    assert diverged["step"] == step and reason in diverged["reason"]
    assert not (result.run_dir / "children" / "t4" / "c1" / "final").exists()
    assert _equal(_weights(result.run_dir / "parent" / "final"), _weights(result.run_dir / "children/t4/c0/final"))
    assert "DIVERGED" in result.format_table()


@pytest.mark.parametrize("kind", ["data_order", "dropout"])
def test_sgd_noise_children_differ_while_control_stays_equal(tmp_path, kind):
    stability = StabilityArguments(spawn_steps=[4], num_children=1, perturbation_kind=kind)
    result = tiny_trainer(tmp_path, stability).butterfly()
    run = result.run_dir
    parent = _weights(run / "parent" / "final")
    assert _equal(parent, _weights(run / "children/t4/c0/final"))
    assert not _equal(parent, _weights(run / "children/t4/c1/final"))
    record = json.loads((run / "children/t4/c1/perturbation.json").read_text())
    assert record["kind"] == kind and record["reseed"] is not None and record["change_l2"] == 0


def test_stability_arguments_parse_with_hf_argument_parser():
    parser = HfArgumentParser((StabilityArguments, TrainingArguments))
    stability, _ = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--spawn_steps", "50", "0", "10", "--num_children", "4", "--perturbation_scale",
         "0.001", "--perturbation_include", "encoder", "pooler", "--control_child", "false"]
    )
    assert stability.spawn_steps == [0, 10, 50] and stability.num_children == 4
    assert stability.perturbation_include == ["encoder", "pooler"] and stability.child_indices() == [1, 2, 3, 4]
    with pytest.raises(HfStabilityError, match="finite number >= 0"):
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--perturbation_scale", "nan"])
    with pytest.raises(SystemExit):  # an enum: argparse's usage error lists the choices
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--perturbation_kind", "uniform"])
    with pytest.raises(HfStabilityError, match="Unknown perturbation kind 'uniform': choose one of none, gaussian"):
        StabilityArguments(perturbation_kind="uniform")  # as a config file gives it


def test_butterfly_refuses_settings_that_break_the_comparison(tmp_path):
    trainer = tiny_trainer(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    with pytest.raises(HfStabilityError, match="load_best_model_at_end"):
        trainer.butterfly()
    train, _ = tweets()
    model = tiny_bert(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = StabilityTrainer(
        model=model, args=training_args(tmp_path / "b"), train_dataset=train, optimizers=(optimizer, None)
    )
    with pytest.raises(HfStabilityError, match="fresh optimizer"):
        trainer.butterfly()


def test_a_second_butterfly_on_the_same_trainer_finds_its_own_run(tmp_path):
    # training fills in config fields (architectures, problem_type...): they are not the run's identity
    trainer = tiny_trainer(tmp_path, StabilityArguments(spawn_steps=[2], num_children=1))
    first = trainer.butterfly()
    again = trainer.butterfly()
    assert [(c.spawn_step, c.child, c.status) for c in again.children] == [
        (c.spawn_step, c.child, c.status) for c in first.children
    ]


class _FlagsDuringTraining(TrainerCallback):
    """Records the global determinism settings at every step (a callback that only observes)."""

    def __init__(self):
        self.seen = set()

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.add((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))


def test_deterministic_run_sets_the_flags_while_training_records_them_and_restores_them(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    stability = StabilityArguments(spawn_steps=[0, 3], num_children=1, perturbation_scale=0.5, deterministic=True)
    trainer = tiny_trainer(tmp_path, stability, max_steps=6)
    flags = _FlagsDuringTraining()
    trainer.add_callback(flags)
    trainer.butterfly()
    assert flags.seen == {(True, ":4096:8")}
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    config = json.loads((tmp_path / "stability_config.json").read_text())
    assert config["hardware"] == {"device": "cpu", "deterministic_algorithms": True,
                                  "cublas_workspace_config": ":4096:8", "tf32_matmul": None}
    for t in (0, 3):
        assert _equal(_weights(tmp_path / f"children/t{t}/c0/final"), _weights(tmp_path / "parent/final"))
    # deterministic is part of the run's identity: the same directory without it is another run
    with pytest.raises(RunConfigMismatchError, match="deterministic: True -> False"):
        tiny_trainer(tmp_path, StabilityArguments(spawn_steps=[0, 3], num_children=1, perturbation_scale=0.5),
                     max_steps=6).butterfly()


class _ClassWeightedTrainer(StabilityMixin, Trainer):
    """A user's own Trainer subclass that changes the loss: class-weighted cross-entropy."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels, weight=torch.tensor([1.0, 2.0, 4.0]))
        return (loss, outputs) if return_outputs else loss


def test_a_trainer_subclass_with_its_own_loss_gets_butterfly_through_the_mixin(tmp_path):
    train, test = tweets()
    stability = StabilityArguments(spawn_steps=[0, 3], num_children=1, perturbation_scale=0.5, divergence_every=3)

    def build(cls, out, **kwargs):
        return cls(model_init=lambda: tiny_bert(0), args=training_args(out, max_steps=6), train_dataset=train,
                   eval_dataset=test, **kwargs)

    result = build(_ClassWeightedTrainer, tmp_path / "study", stability_args=stability).butterfly()
    parent = _weights(result.run_dir / "parent" / "final")
    # the parent is exactly a run of the user's Trainer: its own loss trained it
    alone = build(_ClassWeightedTrainer, tmp_path / "alone")
    alone.train()
    assert _equal(parent, model_state(alone.model))
    plain = tiny_trainer(tmp_path / "plain", stability, max_steps=6).butterfly()
    assert not _equal(parent, _weights(plain.run_dir / "parent" / "final"))
    # and the study holds: each control is bitwise its parent, each perturbed child is not
    for t in (0, 3):
        assert _equal(parent, _weights(result.run_dir / f"children/t{t}/c0/final"))
        assert not _equal(parent, _weights(result.run_dir / f"children/t{t}/c1/final"))


def test_seq2seq_trainer_gets_butterfly_through_the_mixin(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    class StabilitySeq2SeqTrainer(StabilityMixin, Seq2SeqTrainer):
        pass

    train, test = tweets()
    values = {**training_args(tmp_path).to_dict(), "max_steps": 4, "output_dir": str(tmp_path)}
    args = Seq2SeqTrainingArguments(**values)
    trainer = StabilitySeq2SeqTrainer(model_init=lambda: tiny_bert(0), args=args, train_dataset=train,
                                      eval_dataset=test, stability_args=StabilityArguments(spawn_steps=[1],
                                                                                           num_children=1))
    result = trainer.butterfly()
    assert _equal(_weights(tmp_path / "parent/final"), _weights(tmp_path / "children/t1/c0/final"))
    assert {row.status for row in result.children} == {"done"}
