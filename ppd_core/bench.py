"""`python launch.py bench`: plain and PPD decoding measured side by side, in one process.

Modes run interleaved per prompt (rotating order, so drift in machine load spreads evenly):
- hf_generate:      greedy `model.generate` (the reference speed)
- hf_prompt_lookup: `model.generate(prompt_lookup_num_tokens=10)` (transformers' n-gram speculation)
- plain:            the engine with PPD off
- ppd:              the engine with PPD on
- ngram:            the engine with guesses copied from the context only
- ppd_ngram:        both sources in one tree
- ppd_ngram_pruned: ppd_ngram with early pruning (calibration's setting or --early-prune): pruning's own effect
- ppd_dynamic:      PPD with the tree chosen every step from the guesses' confidence (calibrated menu)
- propd:            both sources, the dynamic tree and early pruning where calibration switched it on
- ppd_b<B>, ppd_default: PPD with a tree of budget B built from the measured accuracies, or with the
                    built-in default tree, so that trees can be compared with the calibrated one in one run
With --temperature > 0 every mode samples (seed per prompt = --seed + prompt index); outputs then
differ between modes by design and "identical" is not reported.
tokens/s is end to end (prefill + decoding) for every mode so that all are measured the same way.
Per-prompt results are appended to `<json>.partial.jsonl`, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch
from tqdm import tqdm
from transformers import DynamicCache

from .calibrate import CALIBRATION_PROMPTS, accuracy_table
from .cpu_kernels import describe_packed, kernel_isa
from .engine import EarlyPrune, Engine, InputError, Session, Settings
from .ngram import copy_bound_steps
from .tree import TreeSpec, build_tree, default_tree

MODES = ("hf_generate", "hf_prompt_lookup", "plain", "ppd", "ngram", "ppd_ngram", "ppd_ngram_pruned", "ppd_dynamic",
         "propd")
# mode -> (ppd, ngram, dynamic, early_prune)
ENGINE_MODES = {"plain": (False, False, False, False), "ppd": (True, False, False, False),
                "ngram": (False, True, False, False), "ppd_ngram": (True, True, False, False),
                "ppd_ngram_pruned": (True, True, False, True),
                "ppd_dynamic": (True, False, True, False), "propd": (True, True, True, True)}
DEFAULT_MODES = ("hf_generate", "hf_prompt_lookup", "plain", "ppd", "ppd_ngram", "propd")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help="JSONL prompt file ({'turns': [...]} per line)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="the chat's default (deterministic)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--tree-size", type=int, default=None,
                   help="use a tree of this budget built from the measured accuracies instead of the calibrated one")
    p.add_argument("--json", default=None, help="write the results here (and resume from <json>.partial.jsonl)")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples (lossless speculative sampling)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="base seed of the sampled modes")
    p.add_argument("--early-prune", default=None, metavar="LAYER,TOP_K",
                   help="force early pruning in propd (cut after LAYER layers, keep the early TOP_K), or 'off'; "
                        "default: what calibration chose for this machine")


@dataclass
class ModeTotals:
    new_tokens: int = 0
    forward_passes: int = 0
    tree_nodes: int = 0
    pruned_nodes: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, r: dict) -> None:
        self.new_tokens += len(r["tokens"])
        self.seconds += r["seconds"]
        self.decode_seconds += r["decode_seconds"] or 0.0
        self.forward_passes += r["forward_passes"] or 0
        self.tree_nodes += r.get("tree_nodes") or 0
        self.pruned_nodes += r.get("pruned_nodes") or 0
        self.peak_memory_mb = max(self.peak_memory_mb, r["peak_memory_mb"])
        self.outputs.append(r["tokens"])

    def summary(self) -> dict:
        return {"tokens_per_s": self.new_tokens / self.seconds if self.seconds else 0.0,
                "decode_tokens_per_s": self.new_tokens / self.decode_seconds if self.decode_seconds else None,
                "tau": self.new_tokens / self.forward_passes if self.forward_passes else None,
                "new_tokens": self.new_tokens, "forward_passes": self.forward_passes or None,
                "nodes_per_step": self.tree_nodes / self.forward_passes if self.forward_passes else None,
                "pruned_fraction": self.pruned_nodes / self.tree_nodes if self.tree_nodes else None,
                "step_ms": 1e3 * self.decode_seconds / self.forward_passes if self.forward_passes else None,
                "seconds": round(self.seconds, 3), "peak_memory_mb": round(self.peak_memory_mb, 1)}


class PeakMemory:
    """Peak memory while a block runs: CUDA max allocated, or process RSS sampled every 5 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss / 2**20)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def engine_flags(mode: str) -> tuple[bool, bool, bool, bool]:
    """(ppd, ngram, dynamic, early_prune) of an engine mode; ppd_b<B> / ppd_default are PPD with another tree."""
    return ENGINE_MODES.get(mode, (True, False, False, False))


def run_mode(engine: Engine, mode: str, ids: list[int], settings: Settings, session: Session | None = None,
             tree: TreeSpec | None = None) -> dict:
    """One prompt in one mode -> {tokens, seconds, decode_seconds, forward_passes, peak_memory_mb}."""
    default_tree = engine.tree
    if tree is not None:
        engine.set_tree(tree)
    try:
        with PeakMemory(engine.device) as mem:
            start = time.perf_counter()
            if mode.startswith("hf_"):
                out = hf_generate(engine, ids, settings, lookup=mode == "hf_prompt_lookup")
                decode_s, passes, nodes, pruned = None, None, None, None
            else:
                out, last = [], None
                ppd, ngram, dynamic, prune = engine_flags(mode)
                flags = replace(settings, ppd=ppd, ngram=ngram, dynamic=dynamic, early_prune=prune)
                for chunk in engine.generate(prompt_ids=ids, session=session, settings=flags):
                    out += chunk.token_ids
                    last = chunk.counters
                decode_s, passes, nodes, pruned = last.decode_s, last.forward_passes, last.tree_nodes, last.pruned_nodes
            seconds = time.perf_counter() - start
    finally:
        if tree is not None:
            engine.set_tree(default_tree)
    return {"tokens": out, "seconds": seconds, "decode_seconds": decode_s, "forward_passes": passes,
            "tree_nodes": nodes, "pruned_nodes": pruned, "peak_memory_mb": mem.peak}


def run_conversation(engine: Engine, mode: str, turns: list[str], settings: Settings,
                     tree: TreeSpec | None = None) -> list[dict]:
    """Every user turn in order, each asked after the model's own previous reply (one KV session)."""
    session, messages, results = Session(), [], []
    for k, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        turn_settings = replace(settings, seed=settings.seed + k) if settings.seed is not None else settings
        ids = engine.encode(messages)
        result = run_mode(engine, mode, ids, turn_settings, session, tree)
        if mode == "plain":  # what the copy bound (`copy_bound`) reads
            result["context"] = ids
        messages.append({"role": "assistant", "content": engine.tokenizer.decode(result["tokens"],
                                                                                skip_special_tokens=True)})
        results.append(result)
    return results


def hf_generate(engine: Engine, ids: list[int], settings: Settings, lookup: bool) -> list[int]:
    inp = torch.tensor([ids], device=engine.device)
    kwargs: dict = {"prompt_lookup_num_tokens": 10} if lookup else {}
    if settings.sampling:
        kwargs |= {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                   "top_k": settings.top_k or None, "min_p": settings.min_p or None}
        torch.manual_seed(settings.seed or 0)
    else:
        kwargs["do_sample"] = False
    with torch.inference_mode():
        # the prompt split as the engine splits it (all but the last token, then the last one as the first step):
        # a one-shot prefill takes SDPA's attention, whose last bits differ, and under bf16 matmuls that alone
        # flips greedy near-ties (measured: first difference after 42-89 tokens), which says nothing about decoding
        cache = DynamicCache()
        if len(ids) > 1:
            engine.model(inp[:, :-1], past_key_values=cache, use_cache=True)
        out = engine.model.generate(inp, attention_mask=torch.ones_like(inp), past_key_values=cache,
                                    max_new_tokens=settings.max_new_tokens,
                                    repetition_penalty=settings.repetition_penalty,
                                    pad_token_id=engine.tokenizer.eos_token_id, **kwargs)
    new = out[0, len(ids):].tolist()
    while new and new[-1] in engine.eos_ids:  # the engine does not count the end-of-turn token either
        new.pop()
    return new


def load_prompt_file(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def benchmark(engine: Engine, prompts: list[dict], modes: tuple[str, ...], settings: Settings,
              partial: Path | None = None, trees: dict[str, TreeSpec] | None = None) -> dict:
    """Run every prompt in every mode; returns the JSON report. `trees`: mode -> its own tree."""
    trees = trees or {}
    config = [engine.lm.name, engine.precision, engine.tree.to_json(), settings.max_new_tokens,
              settings.repetition_penalty, settings.temperature, settings.top_p, settings.top_k, settings.min_p,
              settings.seed, list(modes), {m: t.to_json() for m, t in trees.items()}]
    done: dict[str, dict] = {}
    if partial and partial.is_file():
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            if row.get("config") == config:  # results of another configuration are not reused
                done[row["id"]] = row["results"]
    # warm-up: first-call overheads (allocator, kernels) must not land on one mode
    warm = engine.encode([{"role": "user", "content": "Hello!"}])
    for mode in modes:
        run_mode(engine, mode, warm, replace(settings, max_new_tokens=8), tree=trees.get(mode))
    totals = {m: ModeTotals() for m in modes}
    per_turn: dict[int, dict[str, ModeTotals]] = {}
    all_results: list[dict[str, list[dict]]] = []
    for i, row in enumerate(tqdm(prompts, desc="bench", unit="prompt")):
        pid = str(row.get("id", i))
        results = done.get(pid)
        if results is None:
            order = modes[i % len(modes):] + modes[: i % len(modes)]
            prompt_settings = replace(settings, seed=settings.seed + 1000 * i) if settings.sampling else settings
            results = {m: run_conversation(engine, m, row["turns"], prompt_settings, trees.get(m)) for m in order}
            if partial:
                with partial.open("a") as f:
                    f.write(json.dumps({"id": pid, "config": config, "results": results}) + "\n")
        all_results.append(results)
        for m in modes:
            for k, r in enumerate(results[m]):
                for t in (totals[m], per_turn.setdefault(k, {}).setdefault(m, ModeTotals())):
                    t.add(r)
    plain = totals.get("plain")
    plain_runs = [r for row in all_results for r in row.get("plain", [])]
    # resumed rows from before the bound existed carry no context: no bound then, rather than one over a subset
    replies = [(r["context"], r["tokens"]) for r in plain_runs] if all("context" in r for r in plain_runs) else []
    return {
        "model": engine.lm.name, "dtype": engine.precision, "device": str(engine.device),
        "kernel": kernel_isa() if engine.device.type == "cpu" else None,
        "packed_weights": engine.packed_weights,
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores",
        "prompts": len(prompts), "max_new_tokens": settings.max_new_tokens,
        "repetition_penalty": settings.repetition_penalty, "tree_budget": engine.tree.budget,
        "sampling": {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
                     "min_p": settings.min_p, "seed": settings.seed} if settings.sampling else None,
        "tree_budgets": {m: t.budget for m, t in trees.items()},
        "parameter_overhead": engine.parameter_overhead,
        "early_prune": {"layer": engine.early_prune.layer, "top_k": engine.early_prune.top_k}
        if engine.early_prune else None,
        "modes": {m: t.summary() for m, t in totals.items()},
        "identical_to_plain": {m: t.outputs == plain.outputs for m, t in totals.items()}
        if plain and not settings.sampling else {},
        "turns": {str(k + 1): {m: t.summary() for m, t in by_mode.items()} for k, by_mode in per_turn.items()}
        if len(per_turn) > 1 else {},
        "copy_bound": copy_bound(replies, plain) if plain and replies and not settings.sampling else None,
    }


COPY_BOUND_CHAINS = (1, 4)


def copy_bound(replies: list[tuple[list[int], list[int]]], plain: ModeTotals) -> dict:
    """What guesses copied from the context could at most give on plain decoding's own replies (`copy_bound_steps`:
    the best of `chains` context matches verified every step, rows for free): tokens per step, and the end-to-end
    speed-up if every step still cost a plain step (a tree step never costs less), prefill unchanged."""
    out = {}
    new = sum(len(reply) for _, reply in replies)
    # each of the bound's steps costs at least plain's mean step
    step_s = plain.decode_seconds / plain.forward_passes if plain.forward_passes else 0.0
    for chains in COPY_BOUND_CHAINS:
        steps = sum(copy_bound_steps(context, reply, chains) for context, reply in replies)
        tau = new / steps if steps else 1.0
        bound_s = plain.seconds - plain.decode_seconds + steps * step_s
        out[str(chains)] = {"tau": round(tau, 3), "speedup": round(plain.seconds / bound_s, 3) if bound_s else None}
    return out


def markdown_table(report: dict, modes: dict | None = None) -> str:
    modes = report["modes"] if modes is None else modes
    base = modes.get("plain", {}).get("tokens_per_s")
    lines = ["| mode | tokens/s | speed-up vs plain | tau | nodes/step | new tokens | forward passes | peak MB "
             "| identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, s in modes.items():
        speed = f"{s['tokens_per_s'] / base:.2f}x" if base else "-"
        tau = f"{s['tau']:.2f}" if s["tau"] else "-"
        nodes = f"{s['nodes_per_step']:.1f}" if s.get("nodes_per_step") is not None else "-"
        same = report["identical_to_plain"].get(m)
        same_text = "n/a (sampling)" if report.get("sampling") else ("yes" if same else "NO")
        lines.append(f"| {m} | {s['tokens_per_s']:.1f} | {speed} | {tau} | {nodes} | {s['new_tokens']} | "
                     f"{s['forward_passes'] or '-'} | {s['peak_memory_mb']:.0f} | {same_text} |")
    return "\n".join(lines)


def parse_early_prune(text: str, depth: int) -> EarlyPrune | None:
    """'off' or 'LAYER,TOP_K' with 1 <= LAYER < depth and TOP_K >= 1."""
    if text.strip().lower() == "off":
        return None
    try:
        layer, top_k = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--early-prune takes LAYER,TOP_K or off, not {text!r}") from None
    if not (1 <= layer < depth and top_k >= 1):
        raise ValueError(f"--early-prune needs 1 <= LAYER < {depth} and TOP_K >= 1")
    return EarlyPrune(layer, top_k)


def run_bench(args: argparse.Namespace) -> int:
    from .runtime import build_engine

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = {m for m in modes if m not in MODES and m != "ppd_default" and not re.fullmatch(r"ppd_b\d+", m)}
    if unknown:
        print(f"error: unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}, ppd_default, ppd_b<B>",
              file=sys.stderr)
        return 2
    engine = build_engine(args.model, args.dtype, args.device, args.quantization, args.prompt_tokens, args.tree,
                          tree_size=args.tree_size)
    if args.early_prune:
        try:
            engine.early_prune = parse_early_prune(args.early_prune, engine.model.config.num_hidden_layers)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    trees = {}
    for m in modes:
        if m == "ppd_default":
            trees[m] = default_tree(engine.prompt_tokens.n_tokens)
        elif m.startswith("ppd_b"):
            trees[m] = build_tree(accuracy_table(engine, CALIBRATION_PROMPTS), int(m.removeprefix("ppd_b")))
    prompts = load_prompt_file(args.prompts, args.limit)
    try:
        settings = Settings(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            seed=args.seed)
        settings.validate()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    partial = Path(args.json + ".partial.jsonl") if args.json else None
    report = benchmark(engine, prompts, modes, settings, partial, trees)
    report["command"] = "python launch.py " + " ".join(sys.argv[1:])
    sampling = f", sampling {report['sampling']}" if report["sampling"] else ", greedy"
    packed = describe_packed(report["packed_weights"])
    print(f"\nmodel {report['model']}, {report['dtype']}, {report['device']} ({report['machine']}; kernel "
          f"{report['kernel']}{', weights read as ' + packed + ' blocks' if packed else ''}), "
          f"{report['prompts']} prompts from {args.prompts}, {args.max_new_tokens} new tokens max, "
          f"repetition penalty {args.repetition_penalty}{sampling}, tree budget {report['tree_budget']}"
          f"{' ' + str(report['tree_budgets']) if report['tree_budgets'] else ''}\n")
    print(markdown_table(report))
    for mode in ("ppd_ngram_pruned", "propd"):
        if mode in report["modes"]:
            ep, m = report["early_prune"], report["modes"][mode]
            what = (f"after layer {ep['layer']}, early top-{ep['top_k']}: {100 * (m['pruned_fraction'] or 0):.1f} % of "
                    f"the tree's nodes pruned, {m['step_ms']:.1f} ms per decoding step") if ep else "off (calibration)"
            print(f"\n{mode}: early pruning {what}")
    if report["copy_bound"]:
        bound = "; ".join(f"{c} chain{'s' if c != '1' else ''}: tau {b['tau']:.2f}, at most {b['speedup']:.2f}x plain"
                          for c, b in report["copy_bound"].items())
        print(f"\ncopy bound (guesses copied from the context, verified with no row cost, on plain's replies): {bound}")
    for turn, modes in report["turns"].items():
        print(f"\nturn {turn} only:\n")
        print(markdown_table(report, modes))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        partial.unlink(missing_ok=True)
    return 0
