"""``phivlm bench``: phivlm's training, feature caching and generation against the ``transformers`` Llava
reference on the same models and inputs (see ``run`` for what each figure measures)."""
from .report import summary, table
from .run import run_bench
from .env import BenchConfig

__all__ = ["BenchConfig", "run_bench", "summary", "table"]
