"""PEFT adapters for the studies: ``--peft lora`` (or ``ia3``) wraps the model a study builds,
as TRL's ``ModelConfig`` does (``use_peft``, ``lora_r``...). Needs the optional extra ``peft``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..enums import ExplicitEnum
from ..errors import MissingDataError, StudyArgumentsError
from ..hints import setting


class AdapterKind(ExplicitEnum):
    """Which adapter a study trains instead of every weight."""

    __label__ = "peft"
    __error__ = StudyArgumentsError
    NONE = "none"  # full fine-tuning
    LORA = "lora"
    IA3 = "ia3"


@dataclass
class AdapterArguments:
    """A PEFT adapter to train in place of full fine-tuning (the base model stays frozen)."""

    peft: AdapterKind = field(default=AdapterKind.NONE, metadata={"help": "none (full fine-tuning), lora or ia3."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on LoRA's input."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names the adapter wraps (default: peft's choice for the architecture, e.g. "
                  "query and value for BERT)."},
    )

    def __post_init__(self) -> None:
        self.peft = AdapterKind(self.peft)
        if self.lora_r < 1:
            raise StudyArgumentsError(f"lora_r must be >= 1, got {self.lora_r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise StudyArgumentsError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    def wrap(self, model: nn.Module, task_type: str) -> nn.Module:
        """``model`` with this adapter (``model`` itself for ``peft="none"``). ``task_type``: PEFT's
        ("SEQ_CLS", "CAUSAL_LM"...), which also keeps a new head trainable (``modules_to_save``)."""
        if self.peft == AdapterKind.NONE:
            return model
        try:
            import peft
        except ImportError:
            raise MissingDataError(f"{setting('peft', self.peft.value)} needs peft: pip install "
                                   "'hf_stability[peft]'.") from None
        config: Any
        if self.peft == AdapterKind.LORA:
            config = peft.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                     target_modules=self.target_modules, task_type=task_type)
        else:
            config = peft.IA3Config(target_modules=self.target_modules, task_type=task_type,
                                    feedforward_modules=[] if self.target_modules else None)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as err:  # no default target modules for this architecture, or a name that matches none
            raise StudyArgumentsError(
                f"peft cannot put the {self.peft.value} adapter on this {type(model).__name__}: {err} Name the "
                f"modules to wrap: {setting('target_modules', ['query', 'value'], '--target_modules query value')}."
            ) from None
