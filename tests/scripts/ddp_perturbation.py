"""Launched by tests with 2 CPU processes: a plain Trainer with a PerturbationCallback.

Every rank writes its final weights and its perturbation record to OUT/rank<r>.*; the test
checks that the ranks agree (DDP never re-syncs weights, so a rank that drew another
perturbation would end with other weights).
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import tiny_bert, training_args, tweets
from safetensors.torch import save_file
from transformers import Trainer

from hf_stability import PerturbationCallback, PerturbationConfig


def main(out: str, kind: str) -> None:
    train, _ = tweets()
    config = PerturbationConfig(kind=kind, scale=0.05 if kind != "none" else 0.0, batch_size=8)
    callback = PerturbationCallback(config, at_step=3, child=1)
    args = training_args(os.path.join(out, "trainer"), max_steps=6)
    trainer = Trainer(model=tiny_bert(0), args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2, trainer.args.world_size
    weights = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(callback.record.to_dict() if callback.record else None, f)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
