"""Time permutation alignment of two models of one shape: BERT-base, ViT-B/16 or a 7B-shaped
Llama (random init; on the CPU, scaled-down shapes unless --full).

Two pairs:
- planted: b is a randomly permuted copy of a with Gaussian noise added (std 1e-3 x each
  tensor's std): the situation of a child against its parent; recovery is checked;
- independent: a and b initialised from different seeds (the assignment problems are hardest;
  skipped for the 7B shape, where it would only repeat the planted timing at more sweeps).

Weight matching is timed for both pairs (and, for BERT, activation matching on 1,000 examples of
128 random tokens for the planted one). The spec's derivation and numeric check are timed too.
Prints the figures and writes JSON.

    python benchmarks/alignment.py --model bert|vit|llama [--device cuda] [--dtype bfloat16] [--full]
        [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from report import emit
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_stability.analysis.alignment import (
    activation_matching,
    apply_permutation,
    permutation_spec,
    random_permutation,
    weight_matching,
)
from hf_stability.analysis.evaluation import Evaluator

# name -> (full shape, scaled-down shape for a CPU run)
SHAPES = {
    "bert": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
             dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
    "vit": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
    "llama": (dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                   intermediate_size=11008, vocab_size=32000),  # Llama-2-7B
              dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1376, vocab_size=32000)),
}


def _build(name: str, shape: dict, seed: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "bert":
        config, cls = BertConfig(num_labels=3, **shape), BertForSequenceClassification
    elif name == "vit":
        config, cls = ViTConfig(image_size=224, patch_size=16, num_labels=1000, **shape), ViTForImageClassification
    else:
        config, cls = LlamaConfig(**shape), LlamaForCausalLM
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # norms are all ones at init; give them a trained model's spread
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "norm" in pname.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def _l2(a: torch.nn.Module, b: torch.nn.Module) -> float:
    total = 0.0
    for n, p in a.named_parameters():
        total += float((p.float() - b.get_parameter(n).float()).pow(2).sum())
    return total**0.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="bert")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="weights' dtype (default: bfloat16 for llama, else float32)")
    parser.add_argument("--full", action="store_true", help="the full shape on the CPU too")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-activation", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.model == "llama" else "float32"))
    full, small = SHAPES[args.model]
    shape = full if device.type == "cuda" or args.full else small

    a = _build(args.model, shape, 0, device, dtype)
    started = time.perf_counter()
    spec = permutation_spec(a)  # derived and checked numerically on a
    _sync(device)
    spec_seconds = time.perf_counter() - started
    planted = copy.deepcopy(a)
    with torch.no_grad():
        for p in planted.parameters():
            p.add_(1e-3 * p.float().std().to(p.dtype) * torch.randn_like(p))
    reference = _l2(a, planted)
    apply_permutation(planted, random_permutation(spec, torch.Generator().manual_seed(1)), spec, in_place=True)
    pairs = [("planted", planted)]
    if args.model != "llama":
        pairs.append(("independent", _build(args.model, shape, 1, device, dtype)))

    groups = [g for g in spec.groups if g.attention]
    results: dict = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": {"family": args.model, **shape, "dtype": str(dtype).replace("torch.", ""),
                  "parameters": sum(p.numel() for p in a.parameters()),
                  "query_heads": groups[0].num_heads, "key_value_heads": groups[0].key_value_heads,
                  "fixed_qk_dims": groups[0].fixed_qk, "groups": len(spec.groups)},
        "spec_seconds": spec_seconds,
        "runs": [],
    }
    print(f"{args.model}: {results['model']['parameters'] / 1e6:.1f}M parameters, {len(spec.groups)} groups; "
          f"spec derived and checked in {spec_seconds:.2f} s")
    if device.type == "cuda" and args.model != "llama":  # one untimed warm-up (CUDA context, kernels)
        weight_matching(a, a, spec, device=device)
    for name, b in pairs:
        _sync(device)
        result = weight_matching(a, b, spec, device=device)
        before = _l2(a, b)
        apply_permutation(b, result.permutation, spec, in_place=True)
        aligned = _l2(a, b)
        row = {"method": "weight", "pair": name, **result.to_dict(), "seconds": result.seconds,
               "l2_before": before, "l2_after": aligned}
        if name == "planted":
            row["l2_of_noise"] = reference
            row["recovered"] = abs(aligned - reference) <= 1e-3 * reference
        results["runs"].append(row)
        print(f"weight matching, {name}: {result.seconds:.2f} s, {result.iterations} sweeps, "
              f"L2 {before:.2f} -> {aligned:.4f}" + (f" (noise {reference:.4f})" if name == "planted" else ""))
        if name == "planted":  # permute it back for activation matching
            apply_permutation(b, random_permutation(spec, torch.Generator().manual_seed(1)), spec, in_place=True)

    if args.model == "bert" and not args.skip_activation:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (args.examples, args.seq_len), generator=g)
        ids[:, 0] = 101
        data = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
        evaluator = Evaluator(device=device, progress=False)
        result = activation_matching(a, planted, spec, data, batch_size=args.batch_size, evaluator=evaluator)
        apply_permutation(planted, result.permutation, spec, in_place=True)
        aligned = _l2(a, planted)
        row = {"method": "activation", "pair": "planted", "examples": args.examples, "seq_len": args.seq_len,
               **result.to_dict(), "seconds": result.seconds, "l2_after": aligned, "l2_of_noise": reference,
               "recovered": abs(aligned - reference) <= 1e-3 * reference}
        results["runs"].append(row)
        print(f"activation matching, planted, {args.examples} x {args.seq_len} tokens: {result.seconds:.2f} s, "
              f"L2 after {aligned:.4f} (noise {reference:.4f})")

    emit(results, args.output)


if __name__ == "__main__":
    main()
