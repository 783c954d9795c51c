"""A 1B-shaped decoder with LoRA in bf16: a butterfly study (a parent, 4 perturbed children and
a control at each spawn step) fits on one GPU, and the parent's step time against a plain
transformers.Trainer on the same run, in the same process.

The model is a randomly initialised Llama of TinyLlama-1.1B's shape (width 2048, 22 layers, 32
query and 4 key/value heads, MLP 5632, vocabulary 32000), its weights in bf16, a LoRA adapter of
rank 16 on q/k/v/o (float32, as peft keeps it) and bf16 autocast; batches of random tokens of one
length, so that step i costs the same in every run. Runs alternate (plain, study, plain, study...)
so drift of the machine hits both alike; a step's time is the wall time between two consecutive
on_step_end events, so it includes whatever the callbacks do (spawn checkpoints, divergence
snapshots). The headline figure is the median over steps of the ratio parent/plain of the same
step i (pooled over repeats). Peak GPU memory is over the whole study. Prints the figures and
writes benchmarks/results/causal_lm_lora_<device>.json.

    python benchmarks/causal_lm_lora.py                      # one GPU
    python benchmarks/causal_lm_lora.py --hidden_size 64 --num_hidden_layers 2 --intermediate_size 128 \\
        --num_attention_heads 4 --num_key_value_heads 2 --vocab_size 1000 --seq_len 32 --batch_size 2 \\
        --max_steps 6 --repeats 1                            # a scaled-down shape on the CPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from report import emit
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from hf_stability import StabilityArguments, StabilityTrainer


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps, per run (keyed by its output_dir)."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync()
        self._last, self._run = time.perf_counter(), args.output_dir
        self.times.setdefault(self._run, [])

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        self.times[self._run].append(now - self._last)
        self._last = now

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _model_init(cli):
    def build():
        from peft import LoraConfig, get_peft_model

        config = LlamaConfig(vocab_size=cli.vocab_size, hidden_size=cli.hidden_size,
                             num_hidden_layers=cli.num_hidden_layers, num_attention_heads=cli.num_attention_heads,
                             num_key_value_heads=cli.num_key_value_heads, intermediate_size=cli.intermediate_size,
                             max_position_embeddings=max(2048, cli.seq_len), pad_token_id=0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):  # initialised where it trains: a 1B model's init on the CPU takes long
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    return build


def _data(cli) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cli.vocab_size, (cli.batch_size * (cli.max_steps + 1), cli.seq_len), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


def _training(output_dir: str, cli) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=cli.max_steps, per_device_train_batch_size=cli.batch_size,
        learning_rate=2e-4, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=0,
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=cli.divergence_every,
        dataloader_num_workers=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("hidden_size", 2048), ("num_hidden_layers", 22), ("intermediate_size", 5632),
                          ("num_attention_heads", 32), ("num_key_value_heads", 4), ("vocab_size", 32000),
                          ("seq_len", 1024), ("batch_size", 8), ("max_steps", 30), ("children", 4),
                          ("divergence_every", 10), ("repeats", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--output", default=None, help="JSON file (default: results/causal_lm_lora_<device>.json)")
    cli = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    kind = "h200" if "H200" in device else "h100" if "H100" in device else "cpu" if device == "cpu" else "gpu"
    output = cli.output or str(Path(__file__).parent / "results" / f"causal_lm_lora_{kind}.json")
    data, build = _data(cli), _model_init(cli)
    spawn_steps = [0, cli.max_steps // 3]
    plain_times, parent_times, child_times, paired, peaks, study_seconds = [], [], [], [], [], []
    parameters = trainable = None
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(-1, cli.repeats):  # repeat -1 warms the machine up and is not counted
            timer = StepTimer()
            plain = Trainer(model_init=build, args=_training(f"{tmp}/plain{repeat}", cli), train_dataset=data,
                            data_collator=default_data_collator, callbacks=[timer])
            plain.train()
            plain_run = timer.times[f"{tmp}/plain{repeat}"][1:]  # the first step includes start-up
            if parameters is None:
                parameters = sum(p.numel() for p in plain.model.parameters())
                trainable = sum(p.numel() for p in plain.model.parameters() if p.requires_grad)
            del plain
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            timer = StepTimer()
            started = time.perf_counter()
            study = StabilityTrainer(
                model_init=build, args=_training(f"{tmp}/study{repeat}", cli), train_dataset=data,
                data_collator=default_data_collator, callbacks=[timer],
                stability_args=StabilityArguments(spawn_steps=spawn_steps, num_children=cli.children,
                                                  divergence_every=cli.divergence_every, analysis_eval_samples=0,
                                                  analysis_train_samples=0))
            result = study.butterfly()
            seconds = time.perf_counter() - started
            assert {c.status for c in result.children} == {"done"}, [c.status for c in result.children]
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            del study
            if repeat < 0:
                continue
            parent_run = next(v for k, v in timer.times.items() if k.endswith("parent"))[1:]
            for key, values in timer.times.items():
                if "children" in key:
                    child_times += values[1:]
            plain_times += plain_run
            parent_times += parent_run
            paired += [b / a for a, b in zip(plain_run, parent_run)]
            peaks.append(peak)
            study_seconds.append(seconds)
            print(f"repeat {repeat}: plain median {statistics.median(plain_run):.4f}s, parent median "
                  f"{statistics.median(parent_run):.4f}s, study {seconds:.1f}s, peak {peak} GiB", flush=True)

    result = {
        "benchmark": "causal_lm_lora",
        "model": (f"random-init Llama, width {cli.hidden_size}, {cli.num_hidden_layers} layers, "
                  f"{cli.num_attention_heads}/{cli.num_key_value_heads} query/kv heads, MLP {cli.intermediate_size}, "
                  f"vocabulary {cli.vocab_size}; bf16 weights, LoRA r=16 on q/k/v/o (float32), bf16 autocast"),
        "parameters": parameters,
        "trainable_parameters": trainable,
        "batch": f"{cli.batch_size} x {cli.seq_len} tokens",
        "max_steps": cli.max_steps,
        "spawn_steps": spawn_steps,
        "children_per_spawn_step": f"{cli.children} perturbed + 1 control",
        "divergence_every": cli.divergence_every,
        "repeats": cli.repeats,
        "plain_median_step_s": statistics.median(plain_times),
        "parent_median_step_s": statistics.median(parent_times),
        "child_median_step_s": statistics.median(child_times) if child_times else None,
        "median_paired_step_ratio": statistics.median(paired),
        "ratio_of_medians": statistics.median(parent_times) / statistics.median(plain_times),
        "mean_ratio": statistics.mean(parent_times) / statistics.mean(plain_times),
        "target_parent_ratio": 1.05,
        "study_wall_s": study_seconds,
        "peak_gpu_memory_gib": peaks,
        "device": device,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "torch": torch.__version__,
    }
    emit(result, output)


if __name__ == "__main__":
    main()
