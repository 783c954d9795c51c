"""Throughput of barrier evaluation: hf_stability's Evaluator against the obvious way, calling
Trainer.evaluate on a freshly built model at every interpolation point.

Models: MiniLM-shaped BERT (6 layers, 384 hidden; the packaged pretrained weights when present)
for sequence classification, and a ViT-Base/16 (224 px) for image classification. Inputs are
synthetic token ids / pixels of fixed size: the figure is throughput, not accuracy. Both paths
evaluate the same examples at the same alphas with the same batch size and precision, and the
script checks that they find the same losses. Prints the figures and writes JSON.

    python benchmarks/barrier_eval.py [--device cuda] [--bf16] [--examples 4096] [--models minilm,vit]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_stability.analysis import EvalData, Evaluator, barriers
from hf_stability.analysis.interpolation import default_alphas

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


def _minilm(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    try:
        from hf_stability.data import minilm_path

        return BertForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=3)
    except Exception:  # the packaged model is not installed (e.g. on a bare GPU machine): same shape, random
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            num_labels=3)
        return BertForSequenceClassification(config)


def _vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(num_labels=10))


def _data(kind: str, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    if kind == "minilm":
        ids = torch.randint(1000, 30000, (n, seq_len), generator=g)
        ids[:, 0] = 101
        return [{"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long),
                 "labels": int(i % 3)} for i in range(n)]
    pixels = torch.randn(n, 3, 224, 224, generator=g)
    return [{"pixel_values": pixels[i], "labels": int(i % 10)} for i in range(n)]


def _flops_per_example(model: torch.nn.Module, kind: str, seq_len: int) -> float:
    """Forward FLOPs: 2 x (non-embedding parameters) x tokens + attention (QK^T and AV: 4 L^2 d per layer)."""
    config = model.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embedding
    tokens = seq_len if kind == "minilm" else (224 // 16) ** 2 + 1
    return 2.0 * dense * tokens + 4.0 * config.num_hidden_layers * tokens**2 * config.hidden_size


def _trainer_baseline(a, b, data, alphas, batch_size, bf16, device, tmp):
    """Trainer.evaluate on a fresh model per alpha (state dict interpolated, model rebuilt)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    losses = []
    args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none", bf16=bf16,
                             use_cpu=device == "cpu", disable_tqdm=True, dataloader_num_workers=0)
    for alpha in alphas:
        state = {k: torch.lerp(v.float(), state_b[k].float(), alpha).to(v.dtype) if v.is_floating_point() else v
                 for k, v in state_a.items()}
        model = type(a)(copy.deepcopy(a.config))
        model.load_state_dict(state)
        metrics = Trainer(model=model, args=args, eval_dataset=data).evaluate()
        losses.append(metrics["eval_loss"])
    return losses


def bench(kind: str, cli: argparse.Namespace) -> dict:
    a = _minilm(0) if kind == "minilm" else _vit(0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in b.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    data = _data(kind, cli.examples, cli.seq_len)
    alphas = default_alphas(cli.alphas)
    autocast = torch.bfloat16 if cli.bf16 else None
    evaluator = Evaluator(device=cli.device, autocast_dtype=autocast, progress=False)
    eval_data = EvalData(data, batch_size=cli.batch_size, name=kind)
    for i in range(eval_data.num_batches):  # collate once up front, as the analyzer does across children
        eval_data.batch(i)
    # warm-up (kernels, allocator) on a few batches, then the timed run
    evaluator.evaluate(a.to(cli.device), EvalData(data[: cli.batch_size * 2], batch_size=cli.batch_size))
    if cli.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ours = barriers(a, b, eval_data, ("loss",), alphas, evaluator)["loss"]
    if cli.device == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        baseline = _trainer_baseline(a.cpu(), b, data, alphas, cli.batch_size, cli.bf16, cli.device, tmp)
        if cli.device == "cuda":
            torch.cuda.synchronize()
        baseline_s = time.perf_counter() - start

    examples = len(data) * len(alphas)
    flops = _flops_per_example(a, kind, cli.seq_len) * examples
    result = {
        "model": kind,
        "parameters": sum(p.numel() for p in a.parameters()),
        "examples_per_alpha": len(data),
        "alphas": len(alphas),
        "batch_size": cli.batch_size,
        "ours_examples_per_s": examples / ours_s,
        "trainer_examples_per_s": examples / baseline_s,
        "speedup": baseline_s / ours_s,
        "ours_tflops": flops / ours_s / 1e12,
        "max_loss_difference": max(abs(x - y) for x, y in zip(ours.values, baseline)),
    }
    if cli.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["gpu"] = name
        if peak and cli.bf16:
            result["mfu"] = result["ours_tflops"] / peak
            result["peak_tflops_assumed"] = peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="evaluate under bf16 autocast (both paths)")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--alphas", type=int, default=11)
    parser.add_argument("--models", default="minilm,vit")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "barrier_eval.json"))
    cli = parser.parse_args()
    results = [bench(kind, cli) for kind in cli.models.split(",")]
    for r in results:
        print(f"{r['model']:>7}: ours {r['ours_examples_per_s']:9.1f} ex/s, Trainer.evaluate per alpha "
              f"{r['trainer_examples_per_s']:9.1f} ex/s, speed-up {r['speedup']:.2f}x, {r['ours_tflops']:.1f} TFLOP/s"
              + (f", MFU {r['mfu']:.1%}" if "mfu" in r else "") + f", max |loss diff| {r['max_loss_difference']:.2e}")
    out = {"benchmark": "barrier_eval", "device": cli.device, "bf16": cli.bf16, "seq_len": cli.seq_len,
           "machine": platform.platform(), "torch": torch.__version__, "results": results}
    Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.output).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
