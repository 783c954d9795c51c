"""TRL's SFTTrainer through the mixin (issue 23): a real SFTTrainer subclassed with
StabilityMixin runs butterfly() on a tiny Llama (grouped-query attention), fully and with TRL's
own LoRA (peft_config); the control ends bitwise its parent on CPU, and the analysis batches the
saved examples with TRL's own collator, so its token-level loss is the model's own."""

from __future__ import annotations

import pytest
import torch
from test_causal_lm import _llama, _plain_text, _tokenizer, _weights

from hf_stability import StabilityArguments
from hf_stability.analysis import AnalyzeArguments, analyze_run
from hf_stability.analysis.loading import load_run_model, run_collator
from hf_stability.run_directory import RunDirectory
from hf_stability.training import StabilityMixin

trl = pytest.importorskip("trl")  # the test extra installs it (pip install "hf_stability[trl]")


class StabilitySFTTrainer(StabilityMixin, trl.SFTTrainer):
    pass


@pytest.mark.parametrize("lora", [False, True], ids=["full", "trl-peft-config"])
def test_an_sft_trainer_study_keeps_its_control_bitwise_and_analyses_with_trl_s_collator(tmp_path, lora):
    data = _plain_text(96)
    train, evaluation = data.select(range(64)), data.select(range(64, 96))
    run = tmp_path / "run"
    args = trl.SFTConfig(str(run), max_steps=6, per_device_train_batch_size=8, per_device_eval_batch_size=64,
                         learning_rate=3e-3, seed=5, use_cpu=True, report_to="none", save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0, max_length=24, packing=False)
    torch.manual_seed(5)
    peft_config = None
    if lora:  # TRL puts the adapter on the model itself
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = StabilitySFTTrainer(model=_llama(), args=args, train_dataset=train, eval_dataset=evaluation,
                                  processing_class=_tokenizer(), peft_config=peft_config,
                                  stability_args=StabilityArguments(spawn_steps=[0, 3], num_children=1,
                                                                    divergence_every=3, perturbation_scale=0.1))
    result = trainer.butterfly()
    assert {r.status for r in result.children} == {"done"}
    parent = _weights(run / "parent/final")
    for t in (0, 3):
        control = _weights(run / f"children/t{t}/c0/final")
        assert all(torch.equal(parent[name], control[name]) for name in parent), t
        child = _weights(run / f"children/t{t}/c1/final")
        assert any(not torch.equal(parent[name], child[name]) for name in parent), t

    collator = run_collator(RunDirectory(run))
    assert type(collator) is type(trainer.data_collator)  # TRL's own, rebuilt from its arguments
    report = analyze_run(run, AnalyzeArguments(train_samples=16, batch_size=16, alphas=3, cpu=True))
    assert report.settings.head.name == "causal language model"
    # with TRL's LoRA the adapter alone was perturbed and is measured
    assert (report.settings.peft is not None) is lora
    assert (run / "parent/final" / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    model = load_run_model(RunDirectory(run), run / "parent/final", None).eval()
    with torch.no_grad():
        own = float(model(**trainer.data_collator([evaluation[i] for i in range(32)])).loss)
    assert report.parent["eval"].loss == pytest.approx(own, rel=1e-5)
    assert report.settings.alignment.method == "weight"
    for pair in report.parent_child():
        if pair.is_control:
            assert pair.l2.l2 == 0.0 and pair.barriers["eval"]["loss"].barrier == 0.0
