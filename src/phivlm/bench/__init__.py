"""``phivlm bench``: phivlm's training, feature caching and generation against the ``transformers`` Llava
reference on the same models and inputs (see ``run`` for what each figure measures)."""
from .run import BenchConfig, run_bench, summary, table

__all__ = ["BenchConfig", "run_bench", "summary", "table"]
