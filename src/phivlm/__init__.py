"""phivlm: train and serve small LLaVA-style vision-language models.

Importing phivlm registers its model type ``"phivlm"`` with ``transformers``' Auto classes (see
``phivlm.hf``), so exported models load with ``AutoModelForImageTextToText.from_pretrained``. The
registration runs right after ``transformers`` is imported, keeping ``import phivlm`` itself cheap.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"


def _register_hf() -> None:
    try:
        from .hf import register

        register()
    except Exception as e:  # never break `import transformers` for the user
        logging.getLogger(__name__).warning("could not register the phivlm model type with transformers: %s", e)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: registers phivlm once ``transformers`` has finished importing."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_hf()

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_hf()
else:
    sys.meta_path.insert(0, _AfterTransformersImport())
