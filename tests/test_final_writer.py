"""FinalWriter: a child's final/ written in the background holds the bytes Trainer.save_model
writes, keeps tied weights tied, and a failed write raises and leaves nothing behind."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import peft_bert, tiny_bert, tiny_bert_config, training_args
from transformers import BertForMaskedLM, Trainer

from hf_stability.data import load_tokenizer
from hf_stability.training.final_writer import FinalWriter, can_write_in_background, host_copy


def _digests(folder) -> dict[str, str]:
    """sha256 of each file of ``folder`` but the eval results (written by the caller's records)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "eval_results.json"}


def _records(tmp) -> None:
    (tmp / "eval_results.json").write_text(json.dumps({"eval_loss": 1.0}))


@pytest.mark.parametrize("make_model", [lambda: tiny_bert(3), lambda: BertForMaskedLM(tiny_bert_config())],
                         ids=["sequence-classification", "masked-lm-tied"])
def test_background_files_are_those_save_model_writes(tmp_path, make_model):
    torch.manual_seed(0)
    model = make_model()
    tokenizer = load_tokenizer()
    trainer = Trainer(model=model, args=training_args(tmp_path / "out"), processing_class=tokenizer)
    assert can_write_in_background(trainer)
    trainer.save_model(str(tmp_path / "reference"))
    (tmp_path / "reference" / "training_args.bin").unlink()
    (tmp_path / "children").mkdir()
    writer = FinalWriter()
    written = []
    writer.submit(tmp_path / "first" / "final", model, tokenizer, _records)  # the first write: in this thread
    assert _digests(tmp_path / "first" / "final") == _digests(tmp_path / "reference")
    writer.submit(tmp_path / "children" / "final", model, tokenizer, _records, then=lambda: written.append(1))
    with torch.no_grad():  # the next child trains while the file is written: the copy is what was finished
        for p in model.parameters():
            p.add_(1.0)
    writer.wait()
    writer.close()
    final = tmp_path / "children" / "final"
    assert (final / "eval_results.json").is_file()
    assert _digests(final) == _digests(tmp_path / "reference")
    assert written == [1]
    assert not list((tmp_path / "children").glob(".*"))  # no temporary folder left


def test_a_peft_model_or_a_trainer_that_saves_its_own_way_is_written_in_place(tmp_path):
    args = training_args(tmp_path / "out")
    assert not can_write_in_background(Trainer(model=peft_bert(), args=args))  # its adapter, not a state dict

    class OwnSave(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)

    assert not can_write_in_background(OwnSave(model=tiny_bert(0), args=args))
    assert can_write_in_background(Trainer(model=tiny_bert(0), args=args))


def test_host_copy_keeps_shared_storage():
    model = BertForMaskedLM(tiny_bert_config())
    state = model.state_dict()
    tied = ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")
    assert state[tied[0]].data_ptr() == state[tied[1]].data_ptr()
    copy = host_copy(state)
    assert copy[tied[0]].data_ptr() == copy[tied[1]].data_ptr()
    assert copy[tied[0]].data_ptr() != state[tied[0]].data_ptr()
    fused = torch.arange(12.0).reshape(3, 4)
    views = host_copy({"a": fused[1:], "b": fused[:, 1]})
    assert torch.equal(views["a"], fused[1:]) and torch.equal(views["b"], fused[:, 1])
    assert views["a"].untyped_storage().data_ptr() == views["b"].untyped_storage().data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copies from a GPU")
def test_host_copy_from_a_gpu_lands_in_pinned_memory_with_its_ties():
    model = BertForMaskedLM(tiny_bert_config()).cuda()
    state = model.state_dict()
    copy = host_copy(state)
    for name, tensor in state.items():
        assert copy[name].device.type == "cpu" and copy[name].is_pinned()
        assert torch.equal(copy[name], tensor.cpu())
    tied = ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")
    assert copy[tied[0]].data_ptr() == copy[tied[1]].data_ptr()
    with torch.no_grad():  # a copy, not a view that follows the model
        model.get_parameter(tied[0]).add_(1.0)
    assert not torch.equal(copy[tied[0]], model.get_parameter(tied[0]).cpu())


def test_a_failed_write_raises_and_leaves_no_folder(tmp_path):
    model = tiny_bert(0)
    blocker = tmp_path / "child"
    blocker.write_text("a file where the child's folder should be")
    writer = FinalWriter()
    with pytest.raises(OSError):  # the first write, in this thread: at once
        writer.submit(blocker / "final", model, None, _records)
    writer.submit(tmp_path / "a" / "final", model, None, _records)
    writer.submit(blocker / "final", model, None, _records)  # in the background: at wait()
    with pytest.raises(OSError):
        writer.wait()
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "child"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["final"]


def test_over_budget_a_write_waits_for_the_earlier_ones(tmp_path):
    model = tiny_bert(0)
    writer = FinalWriter(budget_bytes=0)
    writer.submit(tmp_path / "first" / "final", model, None, _records)  # in this thread
    writer.submit(tmp_path / "a" / "final", model, None, _records)
    writer.submit(tmp_path / "b" / "final", model, None, _records)
    # with no room for two copies, the third submit waited for the second write to finish
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()
    writer.wait()
    writer.close()
    assert (tmp_path / "b" / "final" / "model.safetensors").is_file()
