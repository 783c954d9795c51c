"""Time permutation alignment of two BERT-base-sized models (12 layers, 768 hidden, 12 heads,
3,072 FFN units, 30,522-token vocabulary).

Two pairs:
- planted: b is a randomly permuted copy of a with Gaussian noise added (std 1e-3 x each
  tensor's std): the situation of a child against its parent; recovery is checked;
- independent: a and b initialised from different seeds (the assignment problems are hardest).

Weight matching is timed for both pairs, activation matching (1,000 examples of 128 random
tokens by default) for the planted one. Prints the figures and writes JSON.

    python benchmarks/alignment.py [--device cuda] [--examples 1000] [--output FILE]
"""

from __future__ import annotations

import argparse
import platform

import torch
from report import emit
from transformers import BertConfig, BertForSequenceClassification

from hf_stability.analysis.alignment import (
    activation_matching,
    apply_permutation,
    permutation_spec,
    random_permutation,
    weight_matching,
)
from hf_stability.analysis.evaluation import Evaluator


def _bert(seed: int, args: argparse.Namespace) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # LayerNorm weights are all ones at init; give them a trained model's spread
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def _l2(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return sum(float((p.double() - b.get_parameter(n).double()).pow(2).sum()) for n, p in a.named_parameters()) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-activation", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    a = _bert(0, args)
    spec = permutation_spec(a)
    noisy = _bert(0, args)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(1e-3 * p.std() * torch.randn_like(p))
    planted = apply_permutation(noisy, random_permutation(spec, torch.Generator().manual_seed(1)), spec)
    independent = _bert(1, args)
    reference = _l2(a, noisy)

    results: dict = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "ffn": 4 * args.hidden,
                  "parameters": sum(p.numel() for p in a.parameters())},
        "runs": [],
    }
    if device.type == "cuda":  # one untimed warm-up (CUDA context, kernels)
        weight_matching(a, a, spec, device=device)
    for name, b in (("planted", planted), ("independent", independent)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        result = weight_matching(a, b, spec, device=device)
        aligned = _l2(a, apply_permutation(b, result.permutation, spec))
        row = {"method": "weight", "pair": name, **result.to_dict(), "l2_before": _l2(a, b), "l2_after": aligned}
        if name == "planted":
            row["l2_of_noise"] = reference
            row["recovered"] = abs(aligned - reference) <= 1e-3 * reference
        results["runs"].append(row)
        print(f"weight matching, {name}: {result.seconds:.2f} s, {result.iterations} sweeps, "
              f"L2 {row['l2_before']:.2f} -> {aligned:.4f}"
              + (f" (noise {reference:.4f})" if name == "planted" else ""))

    if not args.skip_activation:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (args.examples, args.seq_len), generator=g)
        ids[:, 0] = 101
        data = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
        evaluator = Evaluator(device=device, progress=False)
        result = activation_matching(a, planted, spec, data, batch_size=args.batch_size, evaluator=evaluator)
        a.cpu(), planted.cpu()
        aligned = _l2(a, apply_permutation(planted, result.permutation, spec))
        row = {"method": "activation", "pair": "planted", "examples": args.examples, "seq_len": args.seq_len,
               **result.to_dict(), "l2_after": aligned, "l2_of_noise": reference,
               "recovered": abs(aligned - reference) <= 1e-3 * reference}
        results["runs"].append(row)
        print(f"activation matching, planted, {args.examples} x {args.seq_len} tokens: {result.seconds:.2f} s, "
              f"L2 after {aligned:.4f} (noise {reference:.4f})")

    emit(results, args.output)


if __name__ == "__main__":
    main()
