"""FinalWriter: a child's final/ folder written in the background while the next child trains.

Writing a finished child (its weights, config, tokenizer, eval results and the manifest with
their checksums) took about a third of a second per MiniLM child on an H200 host, as long as
dozens of training steps of a stacked group. The study evaluates each child as before, copies
its weights to host memory (one copy per storage, so tied and fused weights stay tied) and hands
the files to a writer thread; the next child trains meanwhile. The files are those
``Trainer.save_model`` writes, byte for byte (tests/test_final_writer.py), written into a
temporary folder renamed to final/ at the end, so a killed run never leaves a final/ that looks
complete. ``wait()`` (end of the children) raises the first failure of any write. The first
write of a writer runs in the caller's thread: whatever the write path imports lazily is then
imported there, never by two threads at once (Python can hand a thread a half-imported module).

Writes are only handed over where that is safe: one process, a plain (not PEFT, not quantized)
transformers model of at most ``BACKGROUND_MAX_BYTES`` of weights, a Trainer whose ``_save`` and
``save_model`` are the Trainer's own. Other set-ups write in place, as before
(``can_write_in_background``). The size limit exists because the writer keeps the finished model
alive until its config is written: the next child may already sit beside it on the device, which
a 7B model cannot afford, and where writing takes seconds anyway.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Models with more bytes of weights than this are written in place (see the module docstring).
BACKGROUND_MAX_BYTES = 2**30


def can_write_in_background(trainer: Any) -> bool:
    """Whether ``trainer``'s model can be saved by a FinalWriter exactly as ``save_model`` would."""
    from transformers import PreTrainedModel, Trainer

    from ..adapters import is_peft_model

    model = trainer.model
    return (
        trainer.args.world_size == 1
        and isinstance(model, PreTrainedModel)
        and not is_peft_model(model)
        and getattr(model, "hf_quantizer", None) is None
        and type(trainer)._save is Trainer._save
        and type(trainer).save_model is Trainer.save_model
        and sum(p.numel() * p.element_size() for p in model.parameters()) <= BACKGROUND_MAX_BYTES
    )


def host_copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` copied to host memory, one copy per storage: tensors that share a storage
    (tied embeddings, views of one fused weight) share it in the copy, at the same offsets, so
    ``save_pretrained`` sees the same ties. From a GPU the copies go to pinned memory, all queued
    before one wait (a copy to pageable memory waits for each storage: 66 ms for a MiniLM's 200
    tensors under cProfile on an H100 host, most of a stacked child's hand-over); torch's host allocator keeps
    the pinned blocks for the next child's copy once a write has dropped them."""
    copies: dict[tuple[str, int], torch.UntypedStorage] = {}
    streams: set[torch.cuda.Stream] = set()
    out: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            out[name] = tensor
            continue
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in copies:
            if tensor.device.type == "cpu":
                copies[key] = storage.clone()
            elif tensor.device.type == "cuda" and storage.nbytes() > 0:
                copy = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
                copies[key] = copy.copy_(storage, non_blocking=True)
                streams.add(torch.cuda.current_stream(tensor.device))
            else:
                copies[key] = storage.cpu()
        out[name] = torch.empty(0, dtype=tensor.dtype).set_(copies[key], tensor.storage_offset(), tensor.size(),
                                                            tensor.stride())
    for stream in streams:  # the copies have landed before anyone reads them (or the device changes them)
        stream.synchronize()
    return out


def _bytes(state_dict: dict[str, Any]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in state_dict.values() if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def default_budget_bytes() -> int:
    """Host memory the copies waiting to be written may take: a quarter of what is free."""
    import psutil

    return int(psutil.virtual_memory().available) // 4


class FinalWriter:
    """Writes final/ folders in background threads, holding at most ``budget_bytes`` of weight
    copies at a time (a write that would exceed it first waits for the earlier ones)."""

    def __init__(self, budget_bytes: int | None = None, threads: int | None = None):
        self.budget_bytes = default_budget_bytes() if budget_bytes is None else int(budget_bytes)
        self._pool = ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="hf-stability-final")
        self._pending: list[tuple[Future, int]] = []
        self._first = True

    def submit(self, final_dir: Path, model: nn.Module, processing_class: Any,
               write_records: Callable[[Path], None], then: Callable[[], None] | None = None) -> None:
        """Copy ``model``'s weights to host memory now, then (in a thread) write them with its
        config and ``processing_class`` into a temporary folder beside ``final_dir``, let
        ``write_records(tmp)`` add the eval results and the manifest, rename it to ``final_dir``
        and call ``then``. Raises the failure of an earlier write, if any."""
        if self._first:  # in this thread (see the module docstring)
            self._first = False
            _write_final(Path(final_dir), model, model.state_dict(), processing_class, write_records, then)
            return
        state_dict = host_copy(model.state_dict())
        size = _bytes(state_dict)
        self._raise_finished()
        while self._pending and sum(b for _, b in self._pending) + size > self.budget_bytes:
            self._pending.pop(0)[0].result()  # the oldest write, finished (or its failure raised)
        future = self._pool.submit(_write_final, Path(final_dir), model, state_dict, processing_class,
                                   write_records, then)
        self._pending.append((future, size))

    def wait(self) -> None:
        """Wait for every write, oldest first; raise the first failure (``close`` waits for the rest)."""
        while self._pending:
            self._pending.pop(0)[0].result()

    def close(self) -> None:
        """Wait for the writes in flight without raising (used while another error propagates)."""
        for future, _ in self._pending:
            error = future.exception()
            if error is not None:
                logger.error("Writing a child's final/ failed too: %s", error)
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def _raise_finished(self) -> None:
        """Forget the writes that are done; raise the first failure among them."""
        pending, finished = [], []
        for entry in self._pending:  # one look at each future: one finishing meanwhile stays pending
            (finished if entry[0].done() else pending).append(entry)
        self._pending = pending
        for future, _ in finished:
            future.result()


def _write_final(final_dir: Path, model: nn.Module, state_dict: dict[str, Any], processing_class: Any,
                 write_records: Callable[[Path], None], then: Callable[[], None] | None) -> None:
    """What Trainer._save writes for a PreTrainedModel (less training_args.bin, a pickle the run
    directory does not keep), then the records, then the rename."""
    tmp = final_dir.with_name(".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if processing_class is not None:
            processing_class.save_pretrained(str(tmp))
        write_records(tmp)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if then is not None:
        then()
