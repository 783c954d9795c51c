"""AnalyzeArguments: every option of ``hf-stability analyze RUN_DIR`` (and ``analyze_run``),
parsed by HfArgumentParser; string choices are enums, so ``--help`` lists their values."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..enums import ExplicitEnum
from ..errors import AnalysisArgumentsError


class Pairs(ExplicitEnum):
    """Which pairs of models are measured."""

    __label__ = "pairs"
    __error__ = AnalysisArgumentsError
    PARENT_CHILD = "parent-child"
    CHILD_CHILD = "child-child"
    ALL = "all"


class AlignmentMethod(ExplicitEnum):
    """How the child's hidden units are permuted to match the other model before the aligned figures."""

    __label__ = "alignment"
    __error__ = AnalysisArgumentsError
    AUTO = "auto"  # weight matching where the architecture has a permutation spec; skipped (and said so) elsewhere
    WEIGHT = "weight"
    ACTIVATION = "activation"
    NONE = "none"


class Autocast(ExplicitEnum):
    """The precision evaluation runs under: none (the models' own), bf16 or fp16 autocast, or
    bf16_full: the weights themselves in bf16 along the path (interpolated in fp32, then rounded),
    as the Trainer's ``bf16_full_eval`` does. bf16_full is the fastest on a GPU (no per-forward
    casts of the weights); it measures the bf16 model (weights and activations rounded to bf16,
    about 1e-3 relative), its loss taken in float32 from the logits, so a barrier smaller than
    that rounding is better measured under bf16 autocast or in fp32."""

    __label__ = "autocast"
    __error__ = AnalysisArgumentsError
    NONE = "none"
    BF16 = "bf16"
    FP16 = "fp16"
    BF16_FULL = "bf16_full"

    @property
    def dtype(self):
        """The autocast dtype (None: no autocast). bf16_full autocasts what is not a loss barrier
        (CKA, activation matching) to bf16."""
        import torch

        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16_full": torch.bfloat16}[self.value]

    @property
    def weights_dtype(self):
        """The dtype the evaluated weights are cast to (None: their own)."""
        import torch

        return torch.bfloat16 if self is Autocast.BF16_FULL else None


class PeftPath(ExplicitEnum):
    """Which straight line between two PEFT models the barriers follow."""

    __label__ = "peft_path"
    __error__ = AnalysisArgumentsError
    ADAPTERS = "adapters"  # interpolate the adapters (the base is the same)
    MERGED = "merged"  # interpolate the merged weights, base + adapter


class Pooling(ExplicitEnum):
    """How a sequence of hidden states becomes one representation for CKA."""

    __label__ = "pooling"
    __error__ = AnalysisArgumentsError
    AUTO = "auto"  # the token(s) the model's own head reads (heads.head_readout)
    CLS = "cls"  # the first token
    LAST = "last"  # the last non-padding token
    MEAN = "mean"  # the mean over non-padding tokens
    ALL = "all"  # every non-padding token (for a token classifier: not labelled -100)


@dataclass
class AnalyzeArguments:
    """Options of ``hf-stability analyze RUN_DIR``."""

    eval_split: str = field(
        default="eval",
        metadata={"help": "Saved split (RUN/data/<split>) used for eval barriers, CKA and disagreement."},
    )
    eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples of eval_split."})
    train_samples: int = field(
        default=512, metadata={"help": "Train-subset size for the train-set barriers (0: skip)."})
    pairs: Pairs = field(default=Pairs.PARENT_CHILD, metadata={"help": "Which pairs to measure."})
    alphas: int = field(default=11, metadata={"help": "Interpolation points in [0, 1]."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    pooling: Pooling = field(
        default=Pooling.AUTO, metadata={"help": "Which tokens CKA reads (auto: those the model's own head reads)."})
    autocast: Autocast = field(
        default=Autocast.NONE,
        metadata={"help": "Evaluate under bf16 or fp16 autocast, or with the weights in bf16 (bf16_full: fastest on a "
                  "GPU, like the Trainer's bf16_full_eval; it measures the bf16 model, its loss in float32)."},
    )
    alignment: AlignmentMethod = field(
        default=AlignmentMethod.AUTO,
        metadata={"help": "Permutation alignment before the aligned L2 and barriers (auto: weight matching where "
                  "the architecture has a permutation spec, skipped with the reason in the report elsewhere; "
                  "weight or activation: an architecture without a spec is an error)."},
    )
    alignment_seed: int = field(default=0, metadata={"help": "Seed of weight matching's order of groups."})
    peft_path: PeftPath = field(
        default=PeftPath.ADAPTERS,
        metadata={"help": "For PEFT runs: barriers along the line between the adapters or between the merged "
                  "weights (L2 is reported for both; CKA and alignment use the merged models)."},
    )
    alignment_samples: int = field(
        default=256, metadata={"help": "Examples for activation matching (from the train split, else eval_split)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Evaluate on the CPU even when a GPU is present."})
    reanalyze: bool = field(
        default=False,
        metadata={"help": "Measure every pair again, even those whose inputs (models, records, data, arguments) are "
                  "those of the pair in analysis/report.json (by default such pairs are reused)."},
    )

    def __post_init__(self) -> None:
        self.pairs, self.pooling = Pairs(self.pairs), Pooling(self.pooling)
        self.autocast, self.alignment = Autocast(self.autocast), AlignmentMethod(self.alignment)
        self.peft_path = PeftPath(self.peft_path)
        if self.alignment_samples < 1:
            raise AnalysisArgumentsError(f"alignment_samples must be >= 1, got {self.alignment_samples}.")
        if self.alphas < 2:
            raise AnalysisArgumentsError(f"alphas must be >= 2, got {self.alphas}.")
        if self.train_samples < 0 or (self.eval_samples is not None and self.eval_samples < 1):
            raise AnalysisArgumentsError("train_samples must be >= 0 and eval_samples >= 1.")
