"""The bench results as text: a Markdown table and a summary line of the machine and its load."""
from __future__ import annotations


def _f(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _memory_row(title: str, p: dict, r: dict, ratio: bool = False) -> str:
    """The table row "memory MB, held + step = peak" of phivlm (``p``) and the reference (``r``)."""
    def cell(m: dict) -> str:
        return f"{m['held_mb']:.0f} + {m['step_mb']:.0f} = {m['peak_mb']:.0f}"
    less = f" {r['memory']['peak_mb'] / p['memory']['peak_mb']:.2f}× less " if ratio else " "
    return f"| {title}: memory MB, held + step = peak | {cell(p['memory'])} | {cell(r['memory'])} |{less}| |"


def table(res: dict) -> str:
    """The results as a Markdown table (phivlm, reference, phivlm's advantage, goal)."""
    rows = ["| figure | phivlm | reference (Llava) | phivlm vs reference | goal |", "|---|---|---|---|---|"]
    goals = res.get("goals", {})

    def goal(key: str) -> str:
        g = goals.get(key)
        if not g:
            return ""
        target = f"{g['goal']:g}×" if "speedup" in key else f"{100 * g['goal']:g}%"
        return f"≥ {target}: {'met' if g['met'] else 'missed'}"

    for fig, title in (("stage1", "stage 1 (LM frozen)"), ("stage2", "stage 2 (LoRA)")):
        if fig not in res:
            continue
        s = res[fig]
        p, r = s["phivlm"], s["reference"]
        rows.append(f"| {title}: samples/s | {_f(p['samples_per_s'])} | {_f(r['samples_per_s'])} | "
                    f"**{s['speedup']:.2f}×** (CPU time {s['speedup_cpu']:.2f}×) | {goal(fig + '_speedup')} |")
        rows.append(f"| {title}: tokens/s | {_f(p['tokens_per_s'], 0)} | {_f(r['tokens_per_s'], 0)} | | |")
        rows.append(f"| {title}: s per step, wall / CPU | {p['step_s']:.3f} / {p['step_cpu_s']:.3f} | "
                    f"{r['step_s']:.3f} / {r['step_cpu_s']:.3f} | | |")
        rows.append(f"| {title}: matmul GFLOP per step (fwd + bwd) | {p['flops_per_step'] / 1e9:.1f} | "
                    f"{r['flops_per_step'] / 1e9:.1f} | {r['flops_per_step'] / p['flops_per_step']:.2f}× fewer | |")
        rows.append(f"| {title}: achieved GFLOP/s, MFU | {p['achieved_gflops']:.0f}, **{100 * p['mfu']:.1f}%** | "
                    f"{r['achieved_gflops']:.0f}, {100 * r['mfu']:.1f}% | | "
                    f"{goal('stage2_mfu') if fig == 'stage2' else ''} |")
        rows.append(f"| {title}: first loss (same batch, same weights) | {s['first_loss']['phivlm']:.4f} | "
                    f"{s['first_loss']['reference']:.4f} | |Δ| {s['loss_abs_diff']:.4f} | |")
        if c := s.get("compiled"):
            rows.append(f"| {title}: compiled (--compile): compiling s; loss compiled / eager | "
                        f"{c['compile_s']:.0f}; {c['loss']:.4f} / {c['eager_loss']:.4f} | | | |")
        rows.append(_memory_row(title, p, r, ratio=True))
    if "features" in res:
        s = res["features"]
        p, r = s["phivlm"], s["reference"]
        rows.append(f"| feature caching: images/s (phivlm: files → shards; reference: bare forward) | "
                    f"{_f(p['images_per_s'], 1)} | {_f(r['images_per_s'], 1)} | {s['speedup']:.2f}× | |")
        rows.append(_memory_row("feature caching", p, r))
    if "demo_features" in res:
        s = res["demo_features"]
        p, r, t = s["phivlm"], s["reference"], s["tower"]
        title = f"feature caching, demo tower ({t['name']}, {t['image_size']} px, {t['tiles']}×{t['tiles']} tiles)"
        rows.append(f"| {title}: images/s | {_f(p['images_per_s'], 1)} | {_f(r['images_per_s'], 1)} | "
                    f"{s['speedup']:.2f}× | |")
        rows.append(_memory_row(title, p, r))
    if "generation" in res:
        s = res["generation"]
        p, r = s["phivlm"], s["reference"]
        rows.append(f"| generation: decode tokens/s | {_f(p['tokens_per_s'], 1)} | {_f(r['tokens_per_s'], 1)} | "
                    f"**{s['speedup_tokens_per_s']:.2f}×** | {goal('decode_speedup')} |")
        rows.append(f"| generation: time to first token, s | {p['ttft_s']:.3f} | {r['ttft_s']:.3f} | "
                    f"**{s['speedup_ttft']:.2f}×** | {goal('ttft_speedup')} |")
        same = "yes" if s["same_tokens_as_transformers_decoder"] else "**no**"
        rows.append(f"| generation: greedy tokens equal to the reference's / to phivlm's on transformers' decoder | "
                    f"first {s['tokens_agreeing']} of {s['new_tokens']} / {same} ({s['decoder']} decoder) | | | |")
        rows.append(f"| generation: {s['new_tokens']} tokens end to end, s | {p['total_s']:.3f} | {r['total_s']:.3f} | "
                    f"{s['speedup']:.2f}× | |")
        rows.append(_memory_row("generation", p, r))
    if "matmul_peak" in res:
        m = res["matmul_peak"]
        rows.append(f"| bf16 matmul peak ({m['n']}², {m['probes']} probes): best / median GFLOP/s | "
                    f"{m['peak_gflops']:.0f} / {m['median_gflops']:.0f} | | | |")
    return "\n".join(rows)


def summary(res: dict) -> str:
    m = res["machine"]
    head = (f"phivlm bench: {res['config']['vision']} + {res['config']['lm']}, {m['threads']} threads on {m['cores']} "
            f"cores ({m['cpu']}); load average {m['loadavg_start'][0]:.2f} at start, median "
            f"{m['loadavg_1min_median']:.2f}, max {m['loadavg_1min_max']:.2f}; {m['wall_s']:.0f} s")
    return head + "\n\n" + table(res)
