"""How a study is set up: ready-made studies (text and image classification, the demo) and what
every recipe shares, each a builder that takes its model, data, stability and training
arguments separately, as transformers' run_glue does.

- text_classification.py: ``TextModelArguments``, ``TextDataArguments``, ``build_text_classification_trainer``
- image_classification.py: ``ImageModelArguments``, ``ImageDataArguments``, ``build_image_classification_trainer``
- causal_lm.py: ``CausalModelArguments``, ``CompletionDataArguments``, ``build_causal_lm_trainer``
- decoder_pretraining.py: ``DecoderArguments``, ``CorpusArguments``, ``build_pretraining_trainer``
- demo.py: ``DemoArguments`` and its presets (``hf-stability demo``)
- recipe.py: ``RecipeAnalysisArguments``, ``parse_args`` (a config file and flags), ``run_study``
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "TextModelArguments": ".text_classification",
    "TextDataArguments": ".text_classification",
    "build_text_classification_trainer": ".text_classification",
    "load_text_splits": ".text_classification",
    "ImageModelArguments": ".image_classification",
    "ImageDataArguments": ".image_classification",
    "ImageModelType": ".image_classification",
    "build_image_classification_trainer": ".image_classification",
    "build_image_model": ".image_classification",
    "load_image_splits": ".image_classification",
    "CausalModelArguments": ".causal_lm",
    "CompletionDataArguments": ".causal_lm",
    "build_causal_lm_trainer": ".causal_lm",
    "DecoderArguments": ".decoder_pretraining",
    "CorpusArguments": ".decoder_pretraining",
    "build_pretraining_trainer": ".decoder_pretraining",
    "DemoArguments": ".demo",
    "run_demo": ".demo",
    "RecipeAnalysisArguments": ".recipe",
    "analyze_and_report": ".recipe",
    "parse_args": ".recipe",
    "run_study": ".recipe",
    "setup_logging": ".recipe",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
