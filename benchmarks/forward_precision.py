"""Raw forward throughput by precision, and one stacked training step, with no Evaluator and no
Trainer: what the GPU gives before any of hf_stability's code (docs/performance.md).

Measures the bf16 matmul peak, then the forward of 4,096 examples of BERT-base (sequence length 128)
and ViT-B/16 at batch 256 and 512 under bf16 autocast and with the weights in bf16, and at batch 256
both compiled with torch.compile (with the compile time); then one training step (forward, backward,
AdamW) of a MiniLM-shaped BERT alone (eager and SDPA attention) and of 8 stacked as a StackedModel,
in bf16 autocast and fp32, with a profile of the stacked bf16 step. Needs a GPU.
results/forward_precision_h200.json (and its stacked profile) were written by this benchmark's first
version in the session's exploration: the same measures, the code tidied since.

    python benchmarks/forward_precision.py [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from gpu_peak import measured_bf16_peak_tflops
from profile_table import write_profile
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_stability.training.stacked import StackedModel, use_eager_attention

EXAMPLES = 4096


def _flops(model: torch.nn.Module, tokens: int) -> float:
    config = model.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embedding
    return 2.0 * dense * tokens + 4.0 * config.num_hidden_layers * tokens**2 * config.hidden_size


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=3)).cuda().eval()


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(num_labels=10)).cuda().eval()


def _batches(kind: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, EXAMPLES, batch_size):
        m = min(batch_size, EXAMPLES - start)
        if kind == "bert":
            ids = torch.randint(1000, 30000, (m, 128), generator=g)
            batches.append({"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(),
                            "labels": (torch.arange(m) % 3).cuda()})
        else:
            batches.append({"pixel_values": torch.randn(m, 3, 224, 224, generator=g).cuda(),
                            "labels": (torch.arange(m) % 10).cuda()})
    return batches


def _seconds_per_call(work, warmups: int, repeats: int) -> float:
    """Seconds per call of ``work`` on the GPU, after ``warmups`` calls."""
    for _ in range(warmups):
        work()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _forward_seconds(model, batches, autocast: bool, repeats: int = 3) -> tuple[float, float]:
    """Seconds per pass over ``batches`` (after one warm-up pass) and the mean loss."""
    total = torch.zeros((), device="cuda", dtype=torch.float64)

    def one_pass() -> None:
        nonlocal total
        with torch.inference_mode():
            for batch in batches:
                with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                    total += model(**batch).loss.double()

    seconds = _seconds_per_call(one_pass, 1, repeats)
    return seconds, (total / (repeats + 1) / len(batches)).item()


def _forwards(result: dict) -> None:
    for kind, make, tokens in (("bert", _bert, 128), ("vit", _vit, 197)):
        for batch_size in (256, 512):
            batches = _batches(kind, batch_size)
            model = make()
            flops = _flops(model, tokens) * EXAMPLES
            bf16 = copy.deepcopy(model).to(torch.bfloat16)
            variants = {"autocast_eager": (model, True), "bf16_eager": (bf16, False)}
            if batch_size == 256:
                for name, (source, autocast) in (("autocast", (model, True)), ("bf16", (bf16, False))):
                    started = time.perf_counter()
                    compiled = torch.compile(source)
                    _forward_seconds(compiled, batches[:1], autocast, 1)
                    result[f"{kind}_compile_s_{name}"] = time.perf_counter() - started
                    variants[f"{name}_compiled"] = (compiled, autocast)
            for name, (candidate, autocast) in variants.items():
                seconds, loss = _forward_seconds(candidate, batches, autocast)
                tflops = flops / seconds / 1e12
                result[f"{kind}_{batch_size}_{name}"] = {"ex_s": EXAMPLES / seconds, "tflops": tflops,
                                                         "mfu": tflops / result["peak_tflops"], "loss": loss}
                print(kind, batch_size, name, result[f"{kind}_{batch_size}_{name}"], flush=True)


def _minilm() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        num_labels=3)
    return BertForSequenceClassification(config).cuda()


def _step_seconds(model, batch, bf16: bool, steps: int = 20):
    """Seconds per training step (after 3 warm-up steps) and the step itself."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _seconds_per_call(step, 3, steps), step


def _stacked_steps(result: dict, profile_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (32, 128), generator=g).cuda()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 3, (32,), generator=g).cuda()}
    for bf16 in (True, False):
        single = _minilm().train()
        use_eager_attention(single)
        single_eager, _ = _step_seconds(single, batch, bf16)
        single_sdpa, _ = _step_seconds(_minilm().train(), batch, bf16)
        stacked = StackedModel([_minilm() for _ in range(8)]).cuda().train()
        stacked8, step = _step_seconds(stacked, batch, bf16)
        result[f"step_bf16={bf16}"] = {"single_eager": single_eager, "single_sdpa": single_sdpa,
                                       "stacked8": stacked8, "ratio_vs_8_eager": stacked8 / (8 * single_eager)}
        print(result[f"step_bf16={bf16}"], flush=True)
        if bf16:
            write_profile(lambda step=step: [step() for _ in range(3)], profile_path,
                          "Three training steps of 8 stacked MiniLM-shaped children (batch 32 x 128, bf16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "forward_precision.json"))
    cli = parser.parse_args()
    result: dict = {"peak_tflops": measured_bf16_peak_tflops()}
    print("peak", result["peak_tflops"], flush=True)
    _forwards(result)
    _stacked_steps(result, Path(cli.output).with_name(f"{Path(cli.output).stem}_stacked_profile.txt"))
    Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
