"""CUDA graphs of stacked children's step (training/stacked_graphs.py): a replayed step computes
what the eager step computes (losses, gradients, dropout masks, the RNG it leaves), and a step
that cannot be captured runs eagerly. These need a GPU: on a CPU they are skipped."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from helpers import tiny_bert, training_args
from safetensors.torch import load_file
from torch import nn

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.training.stacked import StackedModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _batches(device: str) -> list[dict[str, torch.Tensor]]:
    """Three batches of 16 tokens, the middle one padded (one signature: the graph captured on the
    second batch replays the third), then three of 12 tokens, padded from the second on (another)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length, padded in ((16, False), (16, True), (16, False), (12, False), (12, True), (12, True)):
        ids = torch.randint(1000, 2000, (4, length), generator=g)
        mask = torch.ones_like(ids)
        if padded:
            mask[1, 9:] = 0
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                    "labels": torch.randint(0, 3, (4,), generator=g).to(device)})
    return out


def _train(stacked: StackedModel, batches, bf16: bool, seed: int = 7):
    """Six AdamW steps from one seed; each step's per-child losses and the CUDA RNG state after it."""
    optimizer = torch.optim.AdamW(stacked.parameters(), lr=1e-3, fused=True)
    torch.manual_seed(seed)
    losses, states = [], []
    for batch in batches:
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = stacked(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(stacked.last_losses.clone())
        states.append(torch.cuda.get_rng_state())
    return losses, states


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_replayed_stacked_steps_compute_what_eager_steps_compute(bf16):
    def stack(cuda_graphs: bool) -> StackedModel:
        # weights large enough (init 0.3) that other dropout masks move the losses far outside the tolerance
        models = [tiny_bert(seed, attention_probs_dropout_prob=0.3, initializer_range=0.3) for seed in range(3)]
        return StackedModel(models, cuda_graphs=cuda_graphs).cuda().train()

    batches = _batches("cuda")
    graphed, eager = stack(True), stack(False)
    graphed_losses, graphed_states = _train(graphed, batches, bf16)
    eager_losses, eager_states = _train(eager, batches, bf16)
    assert graphed.step_graphs.disabled is None and len(graphed.step_graphs.captured) == 2
    tolerance = 2e-2 if bf16 else 1e-5  # the masks are the same; bf16 kernels captured may round otherwise
    for step, (ours, theirs) in enumerate(zip(graphed_losses, eager_losses)):
        assert _relative(ours, theirs) < tolerance, step
    # each replay draws from the generator what the eager step draws, and moves it as far
    assert all(torch.equal(a, b) for a, b in zip(graphed_states, eager_states))
    for name, tensor in eager.stacked_parameters().items():
        assert _relative(graphed.stacked_parameters()[name], tensor) < tolerance, name
    other_losses, _ = _train(stack(False), batches, bf16, seed=8)  # other masks: the comparison sees them
    assert _relative(other_losses[-1], eager_losses[-1]) > 5 * tolerance


class _SyncingClassifier(nn.Module):
    """A classifier whose forward waits for the GPU: it cannot be captured."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(8, 3)

    def forward(self, x, labels):
        logits = self.linear(x)
        torch.cuda.synchronize()
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning(caplog):
    batch = {"x": torch.randn(4, 8, device="cuda"), "labels": torch.tensor([0, 1, 2, 0], device="cuda")}
    graphed = StackedModel([_SyncingClassifier(s) for s in range(2)]).cuda().train()
    eager = StackedModel([_SyncingClassifier(s) for s in range(2)], cuda_graphs=False).cuda().train()
    with caplog.at_level(logging.WARNING, logger="hf_stability.training.stacked_graphs"):
        graphed_losses, _ = _train(graphed, [batch] * 4, bf16=False)
    eager_losses, _ = _train(eager, [batch] * 4, bf16=False)
    assert graphed.step_graphs.disabled is not None and not graphed.step_graphs.captured
    assert any("without CUDA graphs" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(graphed_losses, eager_losses))


def test_a_backward_after_another_forward_of_a_replayed_step_is_refused():
    batch = _batches("cuda")[0]
    stacked = StackedModel([tiny_bert(seed) for seed in range(2)]).cuda().train()
    for _ in range(2):  # the second step is captured
        stacked(**batch)["loss"].backward()
    assert stacked.step_graphs.captured
    first = stacked(**batch)["loss"]
    stacked(**batch)
    with pytest.raises(RuntimeError, match="forward again before its backward"):
        first.backward()


_HOG = """
import sys, torch
free = torch.cuda.mem_get_info()[0]  # (after this process's own CUDA context)
hog = torch.empty((free // 2**21 - 3) * 2**21, dtype=torch.uint8, device="cuda")
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_step_whose_graphs_do_not_fit_in_free_memory_runs_eagerly():
    batches = _batches("cuda")[:3]
    graphed = StackedModel([tiny_bert(seed) for seed in range(2)]).cuda().train()
    eager = StackedModel([tiny_bert(seed) for seed in range(2)], cuda_graphs=False).cuda().train()
    optimizer = torch.optim.AdamW(graphed.parameters(), lr=1e-3, fused=True)
    torch.manual_seed(7)
    graphed(**batches[0])["loss"].backward()  # the eager first step caches what every eager step needs
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    free_before = torch.cuda.mem_get_info()[0]
    # another process takes the device's memory but 4-6 MiB (large blocks come in 2 MiB units): less
    # than the graphs of two children would keep. (A tensor of this process held as much was not all
    # given back by empty_cache on an H100 with torch 2.11, starving the tests after this one.)
    hog = subprocess.Popen([sys.executable, "-c", _HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    graphed_losses = [graphed.last_losses.clone()]
    try:
        assert hog.stdout.readline().strip() == "ready"
        for batch in batches[1:]:
            graphed(**batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            graphed_losses.append(graphed.last_losses.clone())
    finally:
        hog.communicate(timeout=60)  # (its stdin closes: it exits, and the driver takes its memory back)
    assert not graphed.step_graphs.captured and graphed.step_graphs.too_large
    assert graphed.step_graphs.disabled is None
    # this process took nothing of what the other one left: the device's memory is back for the next tests
    assert torch.cuda.mem_get_info()[0] > free_before - 2**30
    eager_losses, _ = _train(eager, batches, bf16=False)
    assert all(torch.equal(a, b) for a, b in zip(graphed_losses, eager_losses))


def _padded_tokens(n: int, seed: int) -> Dataset:
    """``n`` examples of 16 random tokens, every third one padded after 9 (batches with padding and
    without, of one shape: one graph replays both)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0
    return Dataset.from_dict({"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(),
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def test_stacked_children_trained_with_cuda_graphs_end_as_with_eager_steps(tmp_path, caplog):
    """Through the Trainer (gradient accumulation, clipping, the scheduler, padded batches), for two
    spawn steps: the second one's group trains in the first one's stack and replays its graphs."""
    train, test = _padded_tokens(96, 0), _padded_tokens(16, 1)

    def final_weights(name: str, cuda_graphs: bool):
        stability = StabilityArguments(spawn_steps=[0, 4], num_children=3, perturbation_scale=0.5, divergence_every=5,
                                       parallel_children=4, stacked_cuda_graphs=cuda_graphs)
        trainer = StabilityTrainer(
            model_init=lambda: tiny_bert(0), train_dataset=train, eval_dataset=test, stability_args=stability,
            args=training_args(tmp_path / name, max_steps=12, learning_rate=3e-3, max_grad_norm=0.5,
                               gradient_accumulation_steps=2, per_device_train_batch_size=4, use_cpu=False))
        run = trainer.butterfly().run_dir
        return [load_file(str(run / f"children/t{t}/c{k}/final/model.safetensors")) for t in (0, 4) for k in range(4)]

    with caplog.at_level(logging.INFO, logger="hf_stability.training.stacked_graphs"):
        graphed = final_weights("graphed", True)
    # one signature (every batch is 4 x 16), captured once for both groups
    assert sum("Captured" in r.getMessage() for r in caplog.records) == 1
    eager = final_weights("eager", False)
    for ours, theirs in zip(graphed, eager):
        num = sum(float((ours[n].double() - theirs[n].double()).pow(2).sum()) for n in theirs)
        assert math.sqrt(num / sum(float(t.double().pow(2).sum()) for t in theirs.values())) < 1e-5
