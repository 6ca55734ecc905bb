"""Hardware-aware calibration: which tree gives the most tokens per second on *this* machine.

Stage 1 (accuracy, hardware-independent): how often each rank of each prompt token is right, on
training prompts -> A[d][r]; the builder turns A and a row budget B into a tree and predicts its
tokens per step tau(B).
Stage 2 (hardware): the latency of one whole decoding step of each tree on this device, dtype and context
lengths, timed interleaved with medians; latency(B) weights each tree d by how often it runs.
B* = argmax tau(B) / latency(B).
Stage 3 (hardware): early pruning (ProPD) on or off, with its cut layer and top-k, where it pays.
The result is cached per (hardware fingerprint, model, prompt-token weights, dtype, library versions)
and reused until one of them changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from .cpu_kernels import kernel_signature
from .dynamic import TreeMenu
from .engine import Counters, EarlyPrune, Engine, Session, Settings
from .hardware import Hardware, detect
from .models import cache_dir
from .prompt_tokens import model_signature
from .runtime import ASSETS
from .tree import TreeBuffers, TreeSpec, build_tree, plain_spec, steady_state, tree_rows

BUDGETS = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXTS = (128, 512)
# A tree must be predicted this much faster than plain decoding to be used: prediction errors of a few
# per cent must not make the chat slower than PPD off.
MIN_PREDICTED_GAIN = 1.05
CALIBRATION_VERSION = 6  # 4: every tree's step time (the dynamic tree's menu); 5: early pruning decided; 6: in pairs
EARLY_CUTS = (0.25, 0.5, 0.75)  # where early pruning may cut, as fractions of the decoder's depth
EARLY_TOP_K = (1, 3, 10)  # a child survives if its token is in its parent's early top-k
MIN_PRUNE_GAIN = 1.03  # measured gain needed to switch early pruning on (timing noise is a few per cent)
CONFIRM_PAIRS = 3  # fresh (unpruned, pruned) pairs the best early-pruning setting must win again
# 24 prompts drawn from the training set (AlpacaEval CC BY-NC 4.0, GSM8K MIT), shipped so that a fresh
# install can calibrate; never the dev prompts the benchmark measures on
CALIBRATION_PROMPTS = ASSETS / "calibration_prompts.jsonl"


@dataclass(frozen=True)
class Calibration:
    tree: TreeSpec
    report: dict  # {"fingerprint", "cached", "seconds", "b_star", "curve": [...], ...}


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recalibrate", action="store_true", help="ignore the cached result and measure again")
    p.add_argument("--json", default=None, help="write the calibration report here")
    p.add_argument("--plot", default=None, help="write a PNG of tau, latency and tokens/s against B")
    p.add_argument("--prompts", default=str(CALIBRATION_PROMPTS), help="calibration prompts (training set, never dev)")


def _say(msg: str) -> None:
    print(f"[ppd] {msg}", file=sys.stderr, flush=True)


def cache_key(engine: Engine, hw: Hardware) -> dict:
    pt = engine.prompt_tokens
    return {"version": CALIBRATION_VERSION, "fingerprint": hw.fingerprint, "model": model_signature(engine.model),
            "prompt_tokens": pt.weights_hash() if pt is not None else None, "dtype": engine.precision,
            "device": engine.device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "kernel": kernel_signature() if engine.device.type == "cpu" else None,
            "packed_weights": engine.packed_weights}  # packed steps are timed differently


def cache_path(key: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (root or cache_dir() / "calibration") / f"{digest}.json"


def load_cached(path: Path, key: dict) -> Calibration | None:
    """A cached calibration for exactly this key, or None (missing, corrupt or foreign files are not trusted)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            raise ValueError("made for another configuration")
        tree = TreeSpec.from_json(json.dumps(data["tree"]))
        report = {**data["report"], "cached": True}
        return Calibration(tree, report)
    except (ValueError, KeyError, TypeError) as exc:
        _say(f"calibration cache {path} is unusable ({exc}); calibrating again")
        return None


# ---------------------------------------------------------------- stage 1

ACCURACY_TOP_K = 10  # ranks per depth in the accuracy table (trees choose among these)


def accuracy_table(engine: Engine, prompts_file: Path, n_prompts: int = 16, max_new_tokens: int = 64,
                   root: Path | None = None, top_k: int = ACCURACY_TOP_K) -> np.ndarray:
    """A[d][r] for the engine's prompt tokens, measured on training prompts (cached: hardware-independent).

    Its width is fixed, not the engine's current tree's: after a calibration that chose plain decoding
    the tree has one rank, and a one-rank table would cap every tree built from it (a B = 64 tree came
    out with 15 rows)."""
    from .train import measure_accuracy

    pt = engine.prompt_tokens
    shipped = pt.meta.get("accuracy") or {}  # measured on training prompts when the tokens were shipped
    table = np.asarray(shipped.get("table", []), dtype=float)
    if shipped.get("weights") == pt.weights_hash() and table.shape == (pt.n_tokens, top_k):
        return table
    key = json.dumps([model_signature(engine.model), pt.weights_hash(), engine.precision, str(prompts_file),
                      n_prompts, max_new_tokens, top_k])
    path = (root or cache_dir() / "calibration") / f"accuracy-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (ValueError, OSError):
            _say(f"accuracy cache {path} is unusable; measuring again")
    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    prompts = [r["turns"][0] for r in rng.sample(rows, min(n_prompts, len(rows)))]
    acc = measure_accuracy(engine, pt, prompts, max_new_tokens=max_new_tokens, top_k=top_k,
                           batch_size=4, cache_path=path.with_suffix(".replies.jsonl"))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, acc)
    return acc


# ---------------------------------------------------------------- stage 2

def device_sync(device: torch.device):
    """A function that waits for the device to finish queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@torch.inference_mode()
def time_steps(engine: Engine, trees: dict[int, TreeSpec], contexts: tuple[int, ...] = CONTEXTS, repeats: int = 5,
               progress: bool = True) -> dict[tuple[int, int, int], float]:
    """Median seconds of one whole decoding step, keyed (b, d, c): tree b (0 = plain) with d guesses
    available, on a cache of c tokens.

    A whole step, not just the forward: the LM head, the logits processing (repetition penalty on),
    verification and the cache commit cost real time per step on a CPU, and a latency model without
    them predicted 1.11x where the benchmark measured 0.82x. Steps run interleaved in a shuffled order
    each round, so that drifting machine load spreads over all sizes instead of biasing one of them.
    """
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    m = engine.prompt_tokens.n_virtual
    buffers = {b: {d: TreeBuffers.from_spec(spec, d, m, engine.device) for d in spec.trees}
               for b, spec in trees.items()}
    states = {c: engine._prefill(torch.randint(0, vocab, (c,), generator=gen).tolist(), Session(), Counters())
              for c in contexts}
    guesses = torch.randn(engine.prompt_tokens.n_tokens, vocab, generator=gen).to(engine.device)
    modes = {True: Settings(ppd=True, repetition_penalty=1.1), False: Settings(ppd=False, repetition_penalty=1.1)}
    samples: dict[tuple[int, int, int], list[float]] = {
        (b, d, c): [] for b in trees for d in (trees[b].trees if b else [0]) for c in contexts}
    order = list(samples)
    rng = random.Random(0)
    sync = device_sync(engine.device)
    bar = tqdm(total=(repeats + 1) * len(order), desc="timing tree sizes", unit="step", disable=not progress,
               file=sys.stderr)
    for rep in range(repeats + 1):  # round 0 is warm-up
        rng.shuffle(order)
        for b, d, c in order:
            state = states[c]
            state.prompt_logits = guesses[:d] if d else None
            sync()
            start = time.perf_counter()
            engine._step(state, modes[b > 0], None, buffers[b])
            sync()  # CUDA runs asynchronously: without this we would time the kernel launches only
            elapsed = time.perf_counter() - start
            state.cache.crop(c - 1 - state.cache.get_seq_length())  # the prefill cached c - 1 tokens
            if rep:
                samples[(b, d, c)].append(elapsed)
            bar.update()
    bar.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def predict_curve(acc: np.ndarray, trees: dict[int, TreeSpec], latency: dict[tuple[int, int, int], float]
                  ) -> list[dict]:
    """tau(B), the step latency (weighted by how often each tree d runs) and tokens/s, for every B."""
    step_latency = mean_over_contexts(latency)
    curve = []
    for b, spec in sorted(trees.items()):
        if b == 0:
            tau, lat = 1.0, step_latency[(0, 0)]
        else:
            pi, value = steady_state(spec, acc)
            tau = 1.0 + float(pi @ value)
            lat = float(sum(pi[d] * step_latency[(b, d)] for d in spec.trees))
        curve.append({"b": b, "tau": tau, "latency_ms": lat * 1e3, "tokens_per_s": tau / lat})
    return curve


def candidate_trees(acc: np.ndarray, budgets: tuple[int, ...] = BUDGETS) -> dict[int, TreeSpec]:
    """Plain decoding (B = 0) and the best tree of every budget B."""
    return {0: plain_spec(acc.shape[0]), **{b: build_tree(acc, b) for b in budgets}}


def calibrate(engine: Engine, *, recalibrate: bool = False, prompts_file: Path = CALIBRATION_PROMPTS,
              budgets: tuple[int, ...] = BUDGETS, root: Path | None = None, progress: bool = True,
              hardware: Hardware | None = None, accuracy: np.ndarray | None = None, repeats: int = 5) -> Calibration:
    """The best tree for this engine on this machine: from the cache, or measured now (and cached)."""
    start = time.perf_counter()
    hw = hardware or detect()
    key = cache_key(engine, hw)
    path = cache_path(key, root)
    if not recalibrate and (cached := load_cached(path, key)) is not None:
        cached.report["seconds"] = round(time.perf_counter() - start, 3)
        return cached
    if engine.prompt_tokens is None:
        raise ValueError("calibration needs prompt tokens")
    _say(f"calibrating the PPD tree for {hw.describe()}, {engine.precision} "
         "(once for this machine; cached afterwards)")
    acc = accuracy if accuracy is not None else accuracy_table(engine, prompts_file, root=root)
    trees = candidate_trees(acc, budgets)
    latency = time_steps(engine, trees, repeats=repeats, progress=progress)
    curve = predict_curve(acc, trees, latency)
    best = max(curve, key=lambda r: r["tokens_per_s"])
    if best["tokens_per_s"] < MIN_PREDICTED_GAIN * curve[0]["tokens_per_s"]:
        best = curve[0]  # too close to call: plain steps are never slower than plain decoding
    tree = trees[best["b"]]
    early = choose_early_prune(engine, tree, best["b"], curve, prompts_file, progress=progress)
    report = {"fingerprint": hw.fingerprint, "hardware": hw.as_dict(), "cached": False,
              "seconds": round(time.perf_counter() - start, 1), "b_star": best["b"], "curve": curve,
              "accuracy": acc.round(5).tolist(), "dtype": key["dtype"], "model": engine.lm.name,
              "menu": menu_entries(trees, latency), "early_prune": early}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "tree": json.loads(tree.to_json()), "report": report}))
    tmp.replace(path)
    return Calibration(tree, report)


# ---------------------------------------------------------------- stage 3

@torch.inference_mode()
def time_early_head(engine: Engine, rows: int, repeats: int = 9) -> float:
    """Median seconds of the early predictor on `rows` node states: final norm, LM head, top-k."""
    h = torch.randn(rows, engine.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    h = h.to(engine.device, engine.dtype)
    sync = device_sync(engine.device)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        engine._logits(engine.decoder.norm(h)).topk(max(EARLY_TOP_K), dim=-1)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.inference_mode()
def early_agreement(engine: Engine, texts: list[str], cuts: list[int]) -> dict[str, dict[str, float]]:
    """The early predictor's accuracy: how often the LM head on the state after `cut` layers has the model's
    own final choice (argmax of the last layer) in its top-k, over every position of `texts` (chat-encoded)."""
    captured: dict[int, torch.Tensor] = {}
    layers = list(engine.decoder.layers)
    hooks = [layers[c - 1].register_forward_hook(lambda m, a, out, c=c: captured.__setitem__(c, out)) for c in cuts]
    hits = {c: dict.fromkeys(EARLY_TOP_K, 0) for c in cuts}
    total = 0
    try:
        for text in texts:
            ids = torch.tensor([engine.encode([{"role": "user", "content": text}])], device=engine.device)
            final = engine.model(input_ids=ids).logits[0].argmax(-1)
            for c in cuts:
                state = captured[c][0] if isinstance(captured[c], tuple) else captured[c]
                top = engine._logits(engine.decoder.norm(state[0])).topk(max(EARLY_TOP_K), dim=-1).indices
                for k in EARLY_TOP_K:
                    hits[c][k] += int((top[:, :k] == final[:, None]).any(-1).sum())
            total += final.numel()
    finally:
        for h in hooks:
            h.remove()
    return {str(c): {str(k): round(n / max(1, total), 4) for k, n in by_k.items()} for c, by_k in hits.items()}


def pruned_run(engine: Engine, prompts: list[str], prune: EarlyPrune | None, max_new_tokens: int = 32) -> dict:
    """tokens/s, tau and the fraction of nodes pruned on `prompts`, with the engine's tree and `prune`."""
    before = engine.early_prune
    engine.early_prune = prune
    totals = Counters()
    try:
        s = Settings(repetition_penalty=1.1, max_new_tokens=max_new_tokens, early_prune=prune is not None)
        for text in prompts:
            last = None
            for chunk in engine.generate([{"role": "user", "content": text}], s):
                last = chunk.counters
            for name in ("new_tokens", "forward_passes", "tree_nodes", "pruned_nodes", "decode_s"):
                setattr(totals, name, getattr(totals, name) + getattr(last, name))
    finally:
        engine.early_prune = before
    return {"tokens_per_s": totals.new_tokens / totals.decode_s if totals.decode_s else 0.0, "tau": totals.tau,
            "pruned_fraction": totals.pruned_nodes / totals.tree_nodes if totals.tree_nodes else 0.0}


def choose_early_prune(engine: Engine, tree: TreeSpec, b_star: int, curve: list[dict], prompts_file: Path,
                       *, try_anyway: bool = False, progress: bool = True) -> dict:
    """Early pruning on (with its cut layer and top-k) or off, and why.

    A bound first: even if every candidate were dropped at the cut, the layers after it would save at most
    (1 - cut / depth) x (tree step - plain step), while the early predictor (norm + LM head on the nodes)
    costs its own time every step. Where the bound loses at every cut, pruning stays off without a trial
    (on a 2-core CPU the calibrated tree's rows cost ~5 ms of a ~54 ms step and the 49k x 576 head ~6 ms).
    Otherwise real decoding on two calibration prompts decides, each (cut, top-k) against an unpruned run timed
    just before it; the best setting is switched on only if it wins again in fresh pairs.
    """
    report: dict = {"enabled": False, "layer": None, "top_k": None}
    if not engine.layerwise or b_star == 0:
        report["reason"] = "plain decoding chosen" if b_star == 0 else "this model's decoder is not walked layer-wise"
        return report
    depth = engine.model.config.num_hidden_layers
    by_b = {r["b"]: r for r in curve}
    tree_ms, plain_ms = by_b[b_star]["latency_ms"], by_b[0]["latency_ms"]
    head_ms = 1e3 * time_early_head(engine, max(len(nodes) for nodes in tree.trees.values()))
    cuts = sorted({min(depth - 1, max(1, round(f * depth))) for f in EARLY_CUTS})
    bound = {c: (1 - c / depth) * (tree_ms - plain_ms) for c in cuts}
    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    prompts = [r["turns"][0] for r in rows]
    report.update(head_ms=round(head_ms, 2), tree_step_ms=round(tree_ms, 2), plain_step_ms=round(plain_ms, 2),
                  max_saving_ms={str(c): round(v, 2) for c, v in bound.items()},
                  agreement=early_agreement(engine, prompts[:8], cuts))
    if max(bound.values()) <= head_ms and not try_anyway:
        report["reason"] = (f"cannot pay here: pruning every node after the cut would save at most "
                            f"{max(bound.values()):.1f} ms per step, the early predictor costs {head_ms:.1f} ms")
        return report
    prompts = prompts[:2]
    saved = engine.tree
    engine.set_tree(tree)
    try:
        # each setting is timed right after its own unpruned run: this shared machine's speed drifts by 10-30 %
        # over a minute, which a single base run compared with nine later trials read as gains of up to 1.24x
        trials, base = [], None
        for c in tqdm(cuts, desc="early pruning", disable=not progress, file=sys.stderr):
            for k in EARLY_TOP_K:
                unpruned, run = paired_run(engine, prompts, EarlyPrune(c, k))
                base = base or unpruned
                trials.append({"layer": c, "top_k": k, **run})
        best = max(trials, key=lambda t: t["vs_base"])
        # the best of nine noisy ratios overstates its setting, so it has to win again in fresh pairs
        chosen = EarlyPrune(best["layer"], best["top_k"])
        confirm = [paired_run(engine, prompts, chosen)[1]["vs_base"] for _ in range(CONFIRM_PAIRS)]
    finally:
        engine.set_tree(saved)
    gain = statistics.median(confirm)
    report.update(base=base, trials=trials, confirmation=[round(r, 3) for r in confirm])
    if gain >= MIN_PRUNE_GAIN:
        report.update(enabled=True, layer=best["layer"], top_k=best["top_k"],
                      reason=f"measured {gain:.2f}x (median of {CONFIRM_PAIRS} confirming pairs)")
    else:
        report["reason"] = (f"measured at most {best['vs_base']:.2f}x, {gain:.2f}x when confirmed "
                            f"(needs {MIN_PRUNE_GAIN}x)")
    return report


def paired_run(engine: Engine, prompts: list[str], prune: EarlyPrune) -> tuple[dict, dict]:
    """An unpruned run and then a run with `prune` on the same prompts; the second carries "vs_base", its
    tokens/s over the first's."""
    base = pruned_run(engine, prompts, None)
    run = pruned_run(engine, prompts, prune)
    return base, {**run, "vs_base": run["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0}


def early_prune_from_report(report: dict) -> EarlyPrune | None:
    early = report.get("early_prune") or {}
    return EarlyPrune(int(early["layer"]), int(early["top_k"])) if early.get("enabled") else None


def mean_over_contexts(latency: dict[tuple[int, int, int], float]) -> dict[tuple[int, int], float]:
    """(b, d, context) -> seconds  to  (b, d) -> mean seconds over the context lengths timed."""
    groups: dict[tuple[int, int], list[float]] = {}
    for (b, d, _), seconds in latency.items():
        groups.setdefault((b, d), []).append(seconds)
    return {key: float(np.mean(v)) for key, v in groups.items()}


def menu_entries(trees: dict[int, TreeSpec], latency: dict[tuple[int, int, int], float]) -> list[dict]:
    """Every timed tree with its step time per d (mean over the context lengths): the dynamic tree's menu."""
    by_tree = mean_over_contexts(latency)
    return [{"b": b, "tree": json.loads(spec.to_json()), "step_ms": {str(d): 1e3 * by_tree[(b, d)] for d in spec.trees}}
            for b, spec in sorted(trees.items()) if b > 0]


def monotone_fit(xs: list[float], ys: list[float]) -> dict[float, float]:
    """Least-squares non-decreasing fit of y against x (pool adjacent violators): x -> fitted y.

    Single step timings jitter by several ms here, enough to rank a bigger tree faster than a smaller
    one; a step never gets cheaper with more rows, so the menu uses the monotone fit."""
    blocks: list[list] = []  # pooled runs: [x values, sum of y, count]
    for x in sorted(set(xs)):
        vals = [y for xx, y in zip(xs, ys, strict=True) if xx == x]
        blocks.append([[x], sum(vals), len(vals)])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [blocks[-1][0] + last[0], blocks[-1][1] + last[1], blocks[-1][2] + last[2]]
    return {x: total / n for group, total, n in blocks for x in group}


def menu_from_report(report: dict, n_virtual: int = 1, device: torch.device | str = "cpu") -> TreeMenu | None:
    """The dynamic tree's menu from a calibration report (None if the report has none); step times are
    the monotone fit of the measured ones against the tree's rows."""
    entries = report.get("menu") or []
    if not entries:
        return None
    trees = {e["b"]: TreeSpec.from_json(json.dumps(e["tree"])) for e in entries}
    rows = {(e["b"], int(d)): tree_rows(trees[e["b"]], int(d), n_virtual) for e in entries for d in e["step_ms"]}
    measured = [(rows[(e["b"], int(d))], ms / 1e3) for e in entries for d, ms in e["step_ms"].items()]
    fit = monotone_fit([r for r, _ in measured], [s for _, s in measured])
    return TreeMenu(trees, {key: fit[r] for key, r in rows.items()}, n_virtual, device)


def plot_curve(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    b = [r["b"] for r in curve]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, field, label in zip(axes, ("tau", "latency_ms", "tokens_per_s"),
                                ("tokens per step (tau)", "step latency (ms)", "tokens/s (predicted)"), strict=True):
        ax.plot(b, [r[field] for r in curve], marker="o")
        ax.axvline(report["b_star"], color="tab:red", linestyle="--", label=f"B* = {report['b_star']}")
        ax.set_xlabel("tree budget B (rows besides the root)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.suptitle(f"{report.get('model', '')} on {report['hardware']['description']}, {report.get('dtype', '')}\n"
                 f"{early_prune_summary(report)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def early_prune_summary(report: dict) -> str:
    early = report.get("early_prune")
    if not early:
        return "early pruning: not calibrated"
    state = f"on, cut after layer {early['layer']}, early top-{early['top_k']}" if early["enabled"] else "off"
    return f"early pruning: {state} ({early.get('reason', '')})"


def curve_table(report: dict) -> str:
    lines = ["|   B | tau  | latency ms | tokens/s |", "|---|---|---|---|"]
    for r in report["curve"]:
        star = " *" if r["b"] == report["b_star"] else ""
        lines.append(f"| {r['b']:3d}{star} | {r['tau']:.3f} | {r['latency_ms']:.1f} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def run_calibrate(args: argparse.Namespace) -> int:
    from .runtime import build_engine

    engine = build_engine(args.model, args.dtype, args.device, args.quantization, args.prompt_tokens,
                          calibrated=False)
    cal = calibrate(engine, recalibrate=args.recalibrate, prompts_file=Path(args.prompts))
    print(curve_table(cal.report))
    print(f"\nB* = {cal.report['b_star']} ({'cached' if cal.report['cached'] else 'measured'}; "
          f"fingerprint {cal.report['fingerprint']}, {cal.report['seconds']} s)")
    print(early_prune_summary(cal.report))
    if args.json:
        Path(args.json).write_text(json.dumps(cal.report, indent=2))
    if args.plot:
        plot_curve(cal.report, args.plot)
    return 0
