"""``bench --profile``: one call of each contender under torch.profiler."""
from __future__ import annotations

from pathlib import Path

from .env import Env

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
CAST_OPS = ("aten::copy_", "aten::_to_copy")


def profile_calls(env: Env, figure: str, fns: dict) -> dict:
    """One call of each contender under torch.profiler: a table per contender in ``--profile``, and the
    share of self CPU time in matmul kernels, in dtype casts/copies, and the top operators."""
    if not env.cfg.profile:
        return {}
    from torch.profiler import ProfilerActivity, profile

    folder = Path(env.cfg.profile)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        avg = prof.key_averages()
        (folder / f"{figure}_{name}.txt").write_text(
            avg.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
        total = sum(e.self_cpu_time_total for e in avg) or 1
        share = lambda ops: sum(e.self_cpu_time_total for e in avg if e.key in ops) / total  # noqa: E731
        top = sorted(avg, key=lambda e: -e.self_cpu_time_total)[:8]
        out[name] = {"self_cpu_ms": total / 1e3, "matmul_share": share(MATMUL_OPS), "cast_copy_share": share(CAST_OPS),
                     "ops": sum(e.count for e in avg),
                     "top": [[e.key, round(e.self_cpu_time_total / 1e3, 2), e.count] for e in top]}
    return out
