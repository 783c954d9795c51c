"""The Hub model card template of hf_stability's reports (``hf_stability.model_cards`` once
installed: this folder is packaged under that name). Rendered cards of our own studies are
linked from README.md here."""

from pathlib import Path

#: The template ``hf-stability report`` renders with huggingface_hub's ModelCard.from_template.
TEMPLATE = Path(__file__).resolve().with_name("divergence_report.md")
