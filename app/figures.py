"""The figures the app shows (DESIGN §5), computed from the engine's Counters only."""

from __future__ import annotations

from dataclasses import dataclass

from ppd_core.engine import Counters, Engine


@dataclass
class MemoryPeaks:
    """Last measured peak memory per mode, for the runtime memory overhead (per browser session)."""
    plain_mb: float | None = None
    ppd_mb: float | None = None

    def record(self, ppd: bool, counters: Counters) -> None:
        if counters.peak_memory_mb > 0:
            if ppd:
                self.ppd_mb = counters.peak_memory_mb
            else:
                self.plain_mb = counters.peak_memory_mb

    @property
    def runtime_overhead(self) -> float | None:
        """(peak with PPD - peak plain) / peak plain, once both have been measured."""
        if self.plain_mb is None or self.ppd_mb is None or self.plain_mb <= 0:
            return None
        return (self.ppd_mb - self.plain_mb) / self.plain_mb


def hardware_facts(engine: Engine) -> dict:
    return {"device": str(engine.lm.device), "dtype": engine.precision,
            "tree_size": engine.tree.budget, "parameter_overhead": engine.parameter_overhead}


def figures(engine: Engine, counters: Counters | None, ppd: bool, peaks: MemoryPeaks) -> dict:
    """Machine-readable figures of the current/last generation (the tests read these)."""
    c = counters or Counters()
    return {"ppd": ppd, "tokens_per_s": round(c.tokens_per_s, 2), "tau": round(c.tau, 3),
            "forward_passes": c.forward_passes, "new_tokens": c.new_tokens, "accepted_guesses": c.accepted_guesses,
            "accepted_ngram": c.accepted_ngram,
            "nodes_per_step": round(c.tree_nodes / c.forward_passes, 2) if c.forward_passes else 0.0,
            "prefill_tokens": c.prefill_tokens, "prompt_tokens": c.prompt_tokens,
            "prefill_s": round(c.prefill_s, 3), "peak_memory_mb": round(c.peak_memory_mb, 1),
            "runtime_memory_overhead": peaks.runtime_overhead, **hardware_facts(engine)}


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a (run both modes, e.g. in Side by side)" if x is None else f"{x * 100:+.{digits}f} %"


def figures_markdown(f: dict, status: str = "") -> str:
    mode = "PPD" if f["ppd"] else "plain (PPD off)"
    rows = [
        ("mode", mode),
        ("tokens/s", f"**{f['tokens_per_s']:.1f}**"),
        ("acceptance length", f"**{f['tau']:.2f}** tokens / forward pass"),
        ("forward passes", f"{f['forward_passes']} for {f['new_tokens']} new tokens, "
                           f"{f['nodes_per_step']:.1f} guesses verified per pass"),
        ("accepted guesses", f"{f['accepted_guesses'] - f['accepted_ngram']} from prompt tokens, "
                             f"{f['accepted_ngram']} copied from the context"),
        ("prefill", f"{f['prefill_tokens']} of {f['prompt_tokens']} prompt tokens computed "
                    f"(rest reused from the cache), {f['prefill_s']:.2f} s"),
        ("memory: parameters", _pct(f["parameter_overhead"], 4)),
        ("memory: runtime", _pct(f["runtime_memory_overhead"])),
        ("hardware", f"{f['device']} · {f['dtype']} · tree of {f['tree_size']} rows"),
    ]
    table = "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"{status}\n\n" if status else "") + table


def comparison(plain: dict, ppd: dict, identical: bool | None) -> dict:
    speedup = ppd["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] > 0 else None
    return {"plain": plain, "ppd": ppd, "speedup": None if speedup is None else round(speedup, 3),
            "identical": identical}


def comparison_markdown(cmp: dict, status: str = "") -> str:
    p, q = cmp["plain"], cmp["ppd"]
    speed = "n/a" if cmp["speedup"] is None else f"**{cmp['speedup']:.2f}x**"
    same = {None: "(running)", True: "**yes** (lossless)", False: "**NO**: the texts differ"}[cmp["identical"]]
    rows = [("tokens/s", f"{p['tokens_per_s']:.1f}", f"{q['tokens_per_s']:.1f}"),
            ("acceptance length", f"{p['tau']:.2f}", f"{q['tau']:.2f}"),
            ("forward passes", str(p["forward_passes"]), str(q["forward_passes"])),
            ("new tokens", str(p["new_tokens"]), str(q["new_tokens"])),
            ("peak memory (MB)", f"{p['peak_memory_mb']:.0f}", f"{q['peak_memory_mb']:.0f}")]
    table = "| | plain | PPD |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return (f"{status}\n\n" if status else "") + (f"speed-up: {speed} · identical text: {same} · "
                                                  f"memory overhead: {_pct(q['runtime_memory_overhead'])}\n\n{table}")
