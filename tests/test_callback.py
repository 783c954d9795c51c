"""PerturbationCallback inside an unmodified transformers.Trainer, in 1 and 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, model_state, tiny_bert, training_args, tweets
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_stability import PerturbationCallback, PerturbationConfig, SpawnStepError, perturb_model

SCRIPTS = Path(__file__).parent / "scripts"


class _Snapshot(TrainerCallback):
    """Keeps the weights seen at on_step_begin of one step (after the perturbation callback)."""

    def __init__(self, step):
        self.step, self.weights = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = model_state(model)


def _train(tmp_path, callbacks, max_steps=6, **overrides):
    train, _ = tweets()
    trainer = Trainer(
        model=tiny_bert(0),
        args=training_args(tmp_path, max_steps=max_steps, **overrides),
        train_dataset=train,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_callback_applies_exactly_perturb_model_at_its_step(tmp_path):
    config = PerturbationConfig(scale=0.05)
    callback, snapshot = PerturbationCallback(config, at_step=3, child=2), _Snapshot(3)
    _train(tmp_path / "a", [callback, snapshot])
    # the same run without the callback, stopped at step 3, then perturbed by hand
    reference = _train(tmp_path / "b", [], max_steps=6, save_strategy="steps", save_steps=3)
    checkpoint = load_file(str(tmp_path / "b" / "checkpoint-3" / "model.safetensors"))
    model = tiny_bert(0)
    model.load_state_dict(checkpoint, strict=False)
    record = perturb_model(model, config, step=3, child=2)
    expected = model_state(model)
    assert all(torch.equal(snapshot.weights[k], expected[k]) for k in expected)
    assert callback.applied and callback.record == record
    assert any(not torch.equal(reference.model.state_dict()[k], snapshot.weights[k]) for k in expected)


def test_control_callback_leaves_training_bitwise_unchanged(tmp_path):
    plain = _train(tmp_path / "plain", [])
    control = _train(tmp_path / "control", [PerturbationCallback(PerturbationConfig(kind="none"), at_step=2)])
    perturbed = _train(tmp_path / "perturbed", [PerturbationCallback(PerturbationConfig(scale=0.01), at_step=2)])
    a, b, c = (model_state(t.model) for t in (plain, control, perturbed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_dropout_child_changes_training_without_touching_weights_at_the_step(tmp_path):
    callback, snapshot = PerturbationCallback(PerturbationConfig(kind="dropout"), at_step=2), _Snapshot(2)
    plain_snapshot = _Snapshot(2)
    plain = _train(tmp_path / "plain", [plain_snapshot])
    child = _train(tmp_path / "child", [callback, snapshot])
    assert all(torch.equal(snapshot.weights[k], plain_snapshot.weights[k]) for k in snapshot.weights)
    assert any(not torch.equal(plain.model.state_dict()[k], child.model.state_dict()[k]) for k in snapshot.weights)
    assert callback.record.reseed is not None


def test_record_is_written_and_state_is_serialisable(tmp_path):
    callback = PerturbationCallback(PerturbationConfig(scale=0.01), at_step=1, record_path=tmp_path / "p.json")
    _train(tmp_path / "run", [callback], max_steps=3, save_strategy="steps", save_steps=2)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["step"] == 1 and saved["change_l2"] > 0
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    restored = PerturbationCallback.from_state(state["stateful_callbacks"]["PerturbationCallback"])
    assert restored.applied and restored.record.change_l2 == saved["change_l2"]


def test_step_at_or_beyond_training_is_refused(tmp_path):
    with pytest.raises(SpawnStepError, match="at or beyond the last step"):
        _train(tmp_path, [PerturbationCallback(PerturbationConfig(scale=0.01), at_step=6)], max_steps=6)


@pytest.mark.parametrize("kind", ["gaussian", "batch"])
def test_every_rank_applies_the_identical_perturbation(tmp_path, kind):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(SCRIPTS / "ddp_perturbation.py"), str(tmp_path), kind,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == records[1] and records[0]["change_l2"] > 0
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
