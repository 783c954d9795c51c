"""Throughput of barrier evaluation: hf_stability's Evaluator against the obvious way, calling
Trainer.evaluate on a freshly built model at every interpolation point.

Models: MiniLM-shaped BERT (6 layers, 384 hidden; the packaged pretrained weights when present)
and BERT-base (12 layers, 768 hidden) for sequence classification, and a ViT-Base/16 (224 px)
for image classification. Inputs are synthetic token ids / pixels of fixed size: the figure is
throughput, not accuracy. Both paths evaluate the same examples at the same alphas with the same
batch size and precision (--precision: fp32; bf16 autocast, the Trainer's bf16=True; bf16_full,
the weights in bf16, the Trainer's bf16_full_eval=True), and the script checks that they find the
same losses. On a GPU, MFU is against the bf16 peak measured on the machine (gpu_peak.py), and
--profile writes a torch.profiler table of one evaluation at one alpha beside the JSON. Prints
the figures and writes JSON.

    python benchmarks/barrier_eval.py [--device cuda] [--precision bf16_full] [--examples 4096]
        [--models minilm,bert-base,vit] [--profile]
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
from profile_table import device_name, write_profile
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_stability.analysis import EvalData, Evaluator, barriers
from hf_stability.analysis.arguments import Autocast
from hf_stability.analysis.interpolation import Interpolator, default_alphas

PRECISIONS = ("fp32", "bf16", "bf16_full")


def _minilm(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    try:
        from hf_stability.data import minilm_path

        return BertForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=3)
    except Exception:  # the packaged model is not installed (e.g. on a bare GPU machine): same shape, random
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            num_labels=3)
        return BertForSequenceClassification(config)


def _bert_base(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_labels=3))


def _vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(num_labels=10))


MODELS = {"minilm": _minilm, "bert-base": _bert_base, "vit": _vit}


def _data(kind: str, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    if kind != "vit":
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
    tokens = seq_len if kind != "vit" else (224 // 16) ** 2 + 1
    return 2.0 * dense * tokens + 4.0 * config.num_hidden_layers * tokens**2 * config.hidden_size


def _trainer_baseline(a, b, data, alphas, batch_size, precision, device, tmp):
    """Trainer.evaluate on a fresh model per alpha (state dict interpolated, model rebuilt)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    losses = []
    args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none",
                             bf16=precision != "fp32", bf16_full_eval=precision == "bf16_full",
                             use_cpu=device == "cpu", disable_tqdm=True, dataloader_num_workers=0)
    for alpha in alphas:
        state = {k: torch.lerp(v.float(), state_b[k].float(), alpha).to(v.dtype) if v.is_floating_point() else v
                 for k, v in state_a.items()}
        model = type(a)(copy.deepcopy(a.config))
        model.load_state_dict(state)
        metrics = Trainer(model=model, args=args, eval_dataset=data).evaluate()
        losses.append(metrics["eval_loss"])
    return losses


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(kind: str, cli: argparse.Namespace, peak: float | None) -> dict:
    a = MODELS[kind](0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in b.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    data = _data(kind, cli.examples, cli.seq_len)
    alphas = default_alphas(cli.alphas)
    precision = Autocast("none" if cli.precision == "fp32" else cli.precision)
    evaluator = Evaluator(device=cli.device, autocast_dtype=precision.dtype, weights_dtype=precision.weights_dtype,
                          progress=False)
    eval_data = EvalData(data, batch_size=cli.batch_size, name=kind)
    for i in range(eval_data.num_batches):  # collate once up front, as the analyzer does across children
        eval_data.batch(i)
    a.to(cli.device), b.to(cli.device)
    # warm-up (kernels, allocator, the batches' first copy to the device), then the timed run
    barriers(a, b, eval_data, ("loss",), [0.0, 0.5, 1.0], evaluator)
    _sync(cli.device)
    start = time.perf_counter()
    ours = barriers(a, b, eval_data, ("loss",), alphas, evaluator)["loss"]
    _sync(cli.device)
    ours_s = time.perf_counter() - start
    if cli.profile:
        point = Interpolator(a, b, dtype=precision.weights_dtype).set_alpha(0.5)
        write_profile(lambda: evaluator.evaluate(point, eval_data),
                      Path(cli.output).with_name(f"{Path(cli.output).stem}_{kind}_profile.txt"),
                      f"One barrier evaluation (alpha 0.5, {len(data)} examples, batch {cli.batch_size}, "
                      f"{cli.precision}) of {kind} on {device_name() if cli.device == 'cuda' else 'cpu'}")
        del point

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        baseline = _trainer_baseline(a.cpu(), b.cpu(), data, alphas, cli.batch_size, cli.precision, cli.device, tmp)
        _sync(cli.device)
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
    if peak is not None:
        result["mfu"] = result["ours_tflops"] / peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, bf16 autocast or bf16_full (bf16 weights), on both paths")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--alphas", type=int, default=11)
    parser.add_argument("--models", default="minilm,vit")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table per model")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "barrier_eval.json"))
    cli = parser.parse_args()
    peak = None
    if cli.device == "cuda":
        from gpu_peak import measured_bf16_peak_tflops

        peak = measured_bf16_peak_tflops()
    results = [bench(kind, cli, peak) for kind in cli.models.split(",")]
    for r in results:
        print(f"{r['model']:>9}: ours {r['ours_examples_per_s']:9.1f} ex/s, Trainer.evaluate per alpha "
              f"{r['trainer_examples_per_s']:9.1f} ex/s, speed-up {r['speedup']:.2f}x, {r['ours_tflops']:.1f} TFLOP/s"
              + (f", MFU {r['mfu']:.1%}" if "mfu" in r else "") + f", max |loss diff| {r['max_loss_difference']:.2e}")
    out = {"benchmark": "barrier_eval", "device": cli.device, "precision": cli.precision, "seq_len": cli.seq_len,
           "gpu": torch.cuda.get_device_name() if cli.device == "cuda" else None,
           "measured_bf16_peak_tflops": peak, "machine": platform.platform(), "torch": torch.__version__,
           "results": results}
    Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.output).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
