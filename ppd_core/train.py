"""Training prompt tokens by self-distillation, and measuring how well they guess.

Data: the model writes its own replies to training prompts with the chat's default deterministic
decoding (greedy + repetition penalty), so the text after any cut point *is* the model's own
continuation. Then one causal forward over prompt + reply gives every teacher target at once: the
target of prompt token j at cut c is the model's (penalty-processed) distribution at position c + j.
The student rows of many cuts share one forward against the teacher pass's cache: each cut gets a
group of N x m prompt-token rows that see the prefix up to the cut and the earlier prompt tokens of
their own group and ensemble member, laid out exactly as `TreeBuffers.build` does at inference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .cpu_kernels import precision
from .engine import penalise
from .hardware import native_bf16
from .models import DEFAULT_MODEL, DTYPES, cache_dir, eos_ids, load_model
from .prompt_tokens import PromptTokens, model_signature

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_TRAIN_PROMPTS = SHARED_DATA / "train_prompts.jsonl"
DEFAULT_DEV_PROMPTS = SHARED_DATA / "dev_prompts.jsonl"
LOSS_DECAY = 0.8  # weight of prompt token j is 0.8^j (PPD paper)
MAX_PROMPT_TOKENS = 384  # longer training prompts are skipped: padding a batch to them wastes time


# ---------------------------------------------------------------- data: the model's own replies

def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(id, first user turn) per line of a JSONL prompt file."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            out.append((str(row.get("id", i)), row["turns"][0]))
    return out


def encode_chat(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids exactly as the engine builds them (template's default system prompt)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def replies_cache_path(model: PreTrainedModel, prompts_file: str | Path, max_new_tokens: int,
                       repetition_penalty: float, work_dir: Path) -> Path:
    """One cache file per (model, prompt file, decoding settings): replies are paid for once."""
    key = json.dumps([model_signature(model), precision(model), hashlib.sha256(Path(prompts_file).read_bytes())
                      .hexdigest()[:12], max_new_tokens, repetition_penalty])
    return work_dir / f"replies-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def _load_cached(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption
                continue
            done[row["id"]] = row
    return done


@torch.inference_mode()
def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[tuple[str, str]],
                     cache_path: Path, max_new_tokens: int = 256, repetition_penalty: float = 1.1,
                     batch_size: int = 16, max_prompt_tokens: int = MAX_PROMPT_TOKENS, cached_only: bool = False
                     ) -> list[dict]:
    """The model's greedy + repetition-penalty replies, generated in left-padded batches.

    Returns rows {"id", "prompt_ids", "reply_ids"} in the order of `prompts` (long prompts skipped).
    Rows are appended to `cache_path` as they are made, so an interrupted run resumes.
    """
    done = _load_cached(cache_path)
    encoded = [(pid, encode_chat(tokenizer, text)) for pid, text in prompts]
    encoded = [(pid, ids) for pid, ids in encoded if len(ids) <= max_prompt_tokens]
    todo = sorted([(pid, ids) for pid, ids in encoded if pid not in done], key=lambda x: len(x[1]))
    if cached_only:  # make do with the replies already written (a time-boxed run)
        todo = []
    device = model.get_input_embeddings().weight.device
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if todo:
        with open(cache_path, "a") as f, tqdm(total=len(todo), desc="writing replies", unit="reply",
                                               file=sys.stderr) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                width = max(len(ids) for _, ids in batch)
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in batch], device=device)
                attn = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch], device=device)
                out = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=False,
                                     repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, eos_token_id=sorted(stop))
                for (pid, ids), row in zip(batch, out[:, width:].tolist(), strict=True):
                    reply = []
                    for tok in row:
                        reply.append(tok)
                        if tok in stop:
                            break
                    rec = {"id": pid, "prompt_ids": ids, "reply_ids": reply}
                    done[pid] = rec
                    f.write(json.dumps(rec) + "\n")
                f.flush()
                bar.update(len(batch))
    return [done[pid] for pid, _ in encoded if pid in done]


def select_prompts(prompts: list[tuple[str, str]], n: int | None, seed: int) -> list[tuple[str, str]]:
    """A seeded random subset of n prompts (all of them if n is None)."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    chosen = order if n is None else order[:n]
    return [prompts[i] for i in chosen]


def work_dir_for(args_work_dir: str | None) -> Path:
    return Path(args_work_dir) if args_work_dir else cache_dir() / "train"


# ---------------------------------------------------------------- teacher and student passes

def repetition_seen(ids: torch.Tensor, vocab_size: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), V] bool: token v occurs in ids[: t + 1], the context the chat penalises at t."""
    first = torch.full((vocab_size,), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, ids, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    return first[None, :] <= positions[:, None]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The engine's processing (and transformers' repetition penalty), with a [T, V] mask of seen tokens."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, penalise(logits, penalty), logits)


def last_teacher_position(ids: list[int], stop: set[int]) -> int:
    """Last position whose output is a real next-token distribution (not the one after EOS)."""
    return len(ids) - 2 if ids[-1] in stop else len(ids) - 1


def cut_range(prompt_len: int, last_teacher: int, n_tokens: int) -> range:
    """Cuts c (index of the last real token) whose N targets at c+1..c+N all lie inside the reply.

    The first cut is the prompt's last token: the engine's first root carries N prompt tokens too.
    """
    return range(prompt_len - 1, last_teacher - n_tokens + 1)


def student_layout(cuts: list[int], n_tokens: int, n_virtual: int, past: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (cut g, prompt token j, virtual v) in this order, as `TreeBuffers.build` orders a node's rows.

    Returns allow [R, past + R] (row may attend to column: prefix columns 0..cut, then its own group's
    rows (g, j' <= j, v)), positions [R] = cut + j + 1, and source [R] = row of PromptTokens.embeddings.
    """
    g = len(cuts)
    cut = torch.tensor(cuts, device=device)
    j = torch.arange(n_tokens, device=device)
    v = torch.arange(n_virtual, device=device)
    row_cut = cut[:, None, None].expand(g, n_tokens, n_virtual).reshape(-1)
    row_g = torch.arange(g, device=device)[:, None, None].expand(g, n_tokens, n_virtual).reshape(-1)
    row_j = j[None, :, None].expand(g, n_tokens, n_virtual).reshape(-1)
    row_v = v[None, None, :].expand(g, n_tokens, n_virtual).reshape(-1)
    prefix = torch.arange(past, device=device)[None, :] <= row_cut[:, None]
    own = ((row_g[:, None] == row_g[None, :]) & (row_v[:, None] == row_v[None, :])
           & (row_j[None, :] <= row_j[:, None]))
    return torch.cat([prefix, own], dim=1), row_cut + row_j + 1, row_j * n_virtual + row_v


def additive_mask(allow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, q, k] float mask: 0 = attend, finfo.min = blocked (a bool mask is misread under eager)."""
    mask = torch.zeros(allow.shape, dtype=dtype, device=allow.device)
    return mask.masked_fill_(~allow, torch.finfo(dtype).min)[None, None]


def teacher_pass(model: PreTrainedModel, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """One causal forward over prompt + reply: the cache (reused by the student) and raw logits [L, V]."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    return cache, out.logits[0].float()


def teacher_logprobs(logits: torch.Tensor, ids: torch.Tensor, cuts: list[int], n_tokens: int,
                     penalty: float) -> torch.Tensor:
    """[G, N, V] teacher log-probs: the processed distribution at position cut + j + 1 (DESIGN §2 (a))."""
    pos = (torch.tensor(cuts, device=ids.device)[:, None] + torch.arange(1, n_tokens + 1, device=ids.device))
    pos = pos.reshape(-1)
    seen = repetition_seen(ids, logits.shape[-1], pos)
    processed = apply_repetition_penalty(logits[pos], seen, penalty)
    return F.log_softmax(processed, dim=-1).view(len(cuts), n_tokens, -1)


def student_logits(model: PreTrainedModel, prompt_tokens: PromptTokens, cache: DynamicCache, cuts: list[int]
                   ) -> torch.Tensor:
    """[G, N, V] prompt-token logits for each cut (mean over the m virtual rows, as the engine does).

    The rows run against `cache` (the teacher pass over the whole sequence; real tokens never see
    prompt tokens, so their keys/values are exactly what inference has). The cache is cropped back.
    """
    past = cache.get_seq_length()
    n, m = prompt_tokens.n_tokens, prompt_tokens.n_virtual
    device = prompt_tokens.embeddings.device
    allow, positions, source = student_layout(cuts, n, m, past, device)
    dtype = model.get_input_embeddings().weight.dtype
    embeds = prompt_tokens.embeddings[source].to(dtype)
    with prompt_tokens.steering(model, torch.arange(len(source), device=device), source):
        out = model(inputs_embeds=embeds[None], attention_mask=additive_mask(allow, dtype),
                    position_ids=positions[None], past_key_values=cache, use_cache=True)
    cache.crop(-(cache.get_seq_length() - past))  # crop takes the number of tokens to remove
    return out.logits[0].float().view(len(cuts), n, m, -1).mean(2)


def distill_loss(student: torch.Tensor, teacher_lp: torch.Tensor, decay: float = LOSS_DECAY) -> torch.Tensor:
    """Per-cut (1/N) sum_j decay^j KL(teacher_j || student_j), shape [G]."""
    lp_s = F.log_softmax(student, dim=-1)
    kl = (teacher_lp.exp() * (teacher_lp - lp_s)).sum(-1)  # [G, N]
    w = decay ** torch.arange(kl.shape[1], device=kl.device, dtype=kl.dtype)
    return (kl * w).sum(1) / kl.shape[1]


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainConfig:
    n_tokens: int = 3
    n_virtual: int = 1
    deep: bool = False  # per-layer offsets on the prompt tokens' hidden states
    steps: int = 200
    time_budget: float | None = None  # seconds; the cosine schedule then runs on elapsed time
    cuts_per_step: int = 128
    cuts_per_seq: int = 64  # cut points sharing one teacher pass and one student forward
    lr: float = 1e-2
    repetition_penalty: float = 1.1
    seed: int = 0
    init: str = "mean"
    train_dtype: str = "model"  # e.g. bfloat16: CPU matmuls with AVX-512 BF16 are ~2x faster than fp32

    @property
    def variant(self) -> str:
        name = "deep" if self.deep else "plain"
        return name if self.n_virtual == 1 else f"{name}-ensemble-m{self.n_virtual}"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Sample:
    ids: torch.Tensor  # prompt + reply
    cuts: range  # allowed cut points


def make_samples(rows: list[dict], n_tokens: int, stop: set[int], device: torch.device) -> list[Sample]:
    out = []
    for row in rows:
        ids = row["prompt_ids"] + row["reply_ids"]
        cuts = cut_range(len(row["prompt_ids"]), last_teacher_position(ids, stop), n_tokens)
        if len(cuts):
            out.append(Sample(torch.tensor(ids, device=device), cuts))
    return out


def cosine_lr(base: float, progress: float) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def sample_cuts(sample: Sample, k: int, rng: np.random.Generator) -> list[int]:
    k = min(k, len(sample.cuts))
    return sorted(int(sample.cuts[i]) for i in rng.choice(len(sample.cuts), size=k, replace=False))


def sequence_stream(n_samples: int, seed: int, start: int, count: int) -> list[int]:
    """Items start..start+count of an endless stream of seeded per-epoch permutations (resumable)."""
    out = []
    for i in range(start, start + count):
        epoch, at = divmod(i, n_samples)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_samples)[at]))
    return out


def train_step(model: PreTrainedModel, prompt_tokens: PromptTokens, samples: list[Sample], picks: list[int],
               step_rng: np.random.Generator, cfg: TrainConfig) -> tuple[float, float, int]:
    """Accumulate gradients over the picked sequences; returns (mean loss, top-1 agreement, cut points)."""
    plan = []
    left = cfg.cuts_per_step
    for idx in picks:
        cuts = sample_cuts(samples[idx], min(cfg.cuts_per_seq, left), step_rng)
        plan.append((samples[idx], cuts))
        left -= len(cuts)
    total = sum(len(c) for _, c in plan)
    loss_sum, hits, slots = 0.0, 0.0, 0
    for sample, cuts in plan:
        cache, logits = teacher_pass(model, sample.ids)
        target = teacher_logprobs(logits, sample.ids, cuts, cfg.n_tokens, cfg.repetition_penalty)
        del logits
        with torch.enable_grad():
            student = student_logits(model, prompt_tokens, cache, cuts)
            loss = distill_loss(student, target)
            (loss.sum() / total).backward()
        loss_sum += float(loss.detach().sum())
        hits += float((student.detach().argmax(-1) == target.argmax(-1)).float().sum())
        slots += student.shape[0] * student.shape[1]
    return loss_sum / total, hits / max(1, slots), total


def checkpoint_path(work_dir: Path, out: Path, cfg: TrainConfig) -> Path:
    return work_dir / f"ckpt-{out.stem}-{cfg.key()}.pt"


def train_prompt_tokens(model: PreTrainedModel, rows: list[dict], cfg: TrainConfig, stop: set[int],
                        ckpt: Path | None = None, save_every: int = 20, progress: bool = True,
                        init_from: PromptTokens | None = None) -> tuple[PromptTokens, dict]:
    """Self-distil prompt tokens on the model's own replies `rows`. Resumes from `ckpt` if it exists.

    Returns the tokens and a log {"steps", "seconds", "cut_points", "history": [(step, loss, acc)]}.
    """
    device = model.get_input_embeddings().weight.device
    torch.manual_seed(cfg.seed)
    pt = PromptTokens.init_for(model, cfg.n_tokens, cfg.n_virtual, how="mean" if init_from else cfg.init,
                               seed=cfg.seed, deep=cfg.deep)
    if init_from is not None:  # continue training earlier tokens (same N and m; plain tokens may seed deep ones)
        if (init_from.n_tokens, init_from.n_virtual) != (cfg.n_tokens, cfg.n_virtual):
            raise ValueError("--init-from tokens have another N or m")
        with torch.no_grad():
            pt.embeddings.copy_(init_from.embeddings)
            if init_from.offsets is not None and pt.offsets is not None:
                pt.offsets.copy_(init_from.offsets)
    pt.float()  # train in fp32 even on a bf16 model
    pt.requires_grad_(True)
    opt = torch.optim.AdamW(list(pt.parameters()), lr=cfg.lr, weight_decay=0.0)
    log: dict = {"steps": 0, "seconds": 0.0, "cut_points": 0, "history": []}
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        pt.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        log = state["log"]
    samples = make_samples(rows, cfg.n_tokens, stop, device)
    if not samples:
        raise ValueError("no training samples: the replies are too short")
    seqs_per_step = max(1, math.ceil(cfg.cuts_per_step / cfg.cuts_per_seq))

    def save() -> None:
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"weights": pt.state_dict(), "optimizer": opt.state_dict(), "log": log,
                        "config": cfg.__dict__}, tmp)
            tmp.replace(ckpt)

    def progress_frac() -> float:
        if cfg.time_budget:
            return log["seconds"] / cfg.time_budget
        return log["steps"] / cfg.steps

    bar = tqdm(total=None if cfg.time_budget else cfg.steps, initial=log["steps"], desc=f"train {cfg.variant}",
               unit="step", disable=not progress, file=sys.stderr)
    try:
        while progress_frac() < 1.0:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, progress_frac())
            opt.zero_grad(set_to_none=True)
            picks = sequence_stream(len(samples), cfg.seed, log["steps"] * seqs_per_step, seqs_per_step)
            rng = np.random.default_rng([cfg.seed, 1, log["steps"]])
            loss, acc, n_cuts = train_step(model, pt, samples, picks, rng, cfg)
            opt.step()
            log["steps"] += 1
            log["cut_points"] += n_cuts
            log["seconds"] += time.perf_counter() - t0
            log["history"].append((log["steps"], round(loss, 5), round(acc, 5)))
            recent = log["history"][-20:]
            bar.set_postfix(loss=f"{np.mean([h[1] for h in recent]):.3f}",
                            acc=f"{np.mean([h[2] for h in recent]):.3f}", cuts=log["cut_points"])
            bar.update(1)
            if log["steps"] % save_every == 0:
                save()
    finally:  # an interruption keeps the progress made so far
        save()
        bar.close()
    pt.requires_grad_(False)
    return pt, log


# ---------------------------------------------------------------- evaluation

def _model_and_tokenizer(engine_or_model, tokenizer: PreTrainedTokenizerBase | None):
    model = getattr(engine_or_model, "model", engine_or_model)
    tok = tokenizer or getattr(engine_or_model, "tokenizer", None)
    if tok is None:
        raise ValueError("pass tokenizer= when giving a bare model")
    return model, tok


@torch.inference_mode()
def rank_hits(model: PreTrainedModel, prompt_tokens: PromptTokens, rows: list[dict], stop: set[int],
              top_k: int = 10, chunk: int = 64) -> tuple[np.ndarray, int]:
    """Counts [N, top_k]: how often the rank-r guess of prompt token d is the reply's real token; and #cuts.

    Every cut of every reply counts; the truth for prompt token d at cut c is the written token
    c + d + 1, i.e. what greedy decoding with the chat's penalty produced.
    """
    n = prompt_tokens.n_tokens
    device = model.get_input_embeddings().weight.device
    counts = np.zeros((n, top_k))
    total = 0
    for row in tqdm(rows, desc="scoring guesses", unit="reply", file=sys.stderr):
        ids = row["prompt_ids"] + row["reply_ids"]
        # the truth token c + N + 1 must exist (EOS counts: guessing the end is useful)
        cuts = list(range(len(row["prompt_ids"]) - 1, len(ids) - n - 1))
        if not cuts:
            continue
        seq = torch.tensor(ids, device=device)
        cache, _ = teacher_pass(model, seq)
        for start in range(0, len(cuts), chunk):
            part = cuts[start:start + chunk]
            logits = student_logits(model, prompt_tokens, cache, part)  # [G, N, V]
            top = logits.topk(top_k, dim=-1).indices  # [G, N, K]
            truth = seq[torch.tensor(part, device=device)[:, None] + torch.arange(2, n + 2, device=device)]
            counts += (top == truth[..., None]).sum(0).cpu().numpy()
            total += len(part)
    return counts, total


def measure_accuracy(engine_or_model, prompt_tokens: PromptTokens, prompts: list[str] | list[dict], *,
                     tokenizer: PreTrainedTokenizerBase | None = None, max_new_tokens: int = 256,
                     repetition_penalty: float = 1.1, top_k: int = 10, batch_size: int = 16,
                     cache_path: Path | None = None) -> np.ndarray:
    """A[d][r] = P(the rank-r guess of prompt token d+1 is exactly the right token), shape [N, top_k].

    `prompts`: user messages (the model writes its replies first, greedy + repetition penalty, cached in
    `cache_path` if given) or reply rows from `generate_replies`. Calibration reuses this.
    """
    model, tok = _model_and_tokenizer(engine_or_model, tokenizer)
    stop = eos_ids(model, tok)
    if prompts and isinstance(prompts[0], str):
        pairs = [(hashlib.sha256(p.encode()).hexdigest()[:16], p) for p in prompts]
        key = json.dumps([model_signature(model), precision(model), max_new_tokens, repetition_penalty])
        name = f"replies-adhoc-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
        path = cache_path or (work_dir_for(None) / name)
        rows = generate_replies(model, tok, pairs, path, max_new_tokens, repetition_penalty, batch_size)
    else:
        rows = list(prompts)
    counts, total = rank_hits(model, prompt_tokens, rows, stop, top_k)
    return counts / max(1, total)


def measure_tau(engine, prompts: list[str], max_new_tokens: int = 128, repetition_penalty: float = 1.1
                ) -> dict:
    """Real acceptance length: new tokens / forward passes of `Engine.generate` with PPD on."""
    from .engine import Settings

    settings = Settings(max_new_tokens=max_new_tokens, ppd=True, repetition_penalty=repetition_penalty)
    new = passes = 0
    t0 = time.perf_counter()
    for text in tqdm(prompts, desc="tau", unit="prompt", file=sys.stderr):
        last = None
        for chunk in engine.generate([{"role": "user", "content": text}], settings):
            last = chunk
        if last is not None:
            new += last.counters.new_tokens
            passes += last.counters.forward_passes
    return {"tau": new / passes if passes else 0.0, "new_tokens": new, "forward_passes": passes,
            "seconds": round(time.perf_counter() - t0, 1), "prompts": len(prompts)}


def accuracy_table(acc: np.ndarray) -> str:
    """Top-1..top-K cumulative accuracy per depth, as a plain-text table."""
    k = acc.shape[1]
    head = "depth (ahead) | " + " | ".join(f"top-{r + 1}" for r in range(k))
    lines = [head, "-" * len(head)]
    for d in range(acc.shape[0]):
        cum = np.cumsum(acc[d])
        lines.append(f"{d + 1} (token {d + 2}) | " + " | ".join(f"{100 * c:5.1f}" for c in cum))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=str(DEFAULT_TRAIN_PROMPTS), help="JSONL training prompts (never the dev set)")
    p.add_argument("--out", required=True, help="where to write the prompt tokens (.safetensors)")
    p.add_argument("--samples", type=int, default=256, help="how many prompts the model answers for training data")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (ignored with --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, help="train for this many minutes instead of --steps")
    p.add_argument("--n-tokens", type=int, default=3, help="N prompt tokens (guesses for the tokens 2..N+1 ahead)")
    p.add_argument("--n-virtual", type=int, default=1, help="m virtual tokens per prompt token (1 = plain PPD)")
    p.add_argument("--deep", action="store_true",
                   help="also learn a per-layer offset of the prompt tokens' hidden states (more capacity)")
    p.add_argument("--batch-size", type=int, default=128, help="cut points per optimizer step")
    p.add_argument("--cuts-per-seq", type=int, default=64, help="cut points sharing one forward")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256, help="length of the model's training replies")
    p.add_argument("--gen-batch-size", type=int, default=16, help="replies generated per batch")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="the chat's default deterministic decoding")
    p.add_argument("--work-dir", default=None, help="replies cache and checkpoints (default: user cache)")
    p.add_argument("--train-dtype", default="model", choices=["model", "float32", "bfloat16", "float16"],
                   help="dtype of the frozen model while training (replies are always written in --dtype)")
    p.add_argument("--init-from", default=None, help="continue from these prompt tokens instead of the mean init")
    p.add_argument("--cached-only", action="store_true",
                   help="train on the replies already cached for these --samples, without writing the rest")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=str(DEFAULT_DEV_PROMPTS), help="held-out JSONL prompts")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=256, help="length of the replies the guesses are scored on")
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--budgets", default="8,16,32", help="tree sizes whose expected acceptance length is reported")
    p.add_argument("--tau-prompts", type=int, default=10, help="prompts for the real tau run (0 = skip)")
    p.add_argument("--tau-trees", default="built-16", help="comma-separated trees for the real tau run "
                   "(default = the engine's built-in tree, built-B = tree built from the measured accuracy)")
    p.add_argument("--tau-max-new-tokens", type=int, default=128)
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--work-dir", default=None, help="replies cache (default: user cache)")
    p.add_argument("--json", default=None, help="also write the results here")


def run_train(args: argparse.Namespace) -> int:
    if Path(args.prompts).resolve() == DEFAULT_DEV_PROMPTS.resolve():
        print("error: dev_prompts.jsonl is held out for evaluation; train on another prompt file", file=sys.stderr)
        return 2
    lm = load_model(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization)
    work = work_dir_for(args.work_dir)
    # the data sample does not follow --seed: runs with other seeds train on the same (cached) replies
    prompts = select_prompts(read_prompts(args.prompts), args.samples, 0)
    cache = replies_cache_path(lm.model, args.prompts, args.max_new_tokens, args.repetition_penalty, work)
    t0 = time.perf_counter()
    rows = generate_replies(lm.model, lm.tokenizer, prompts, cache, args.max_new_tokens, args.repetition_penalty,
                            args.gen_batch_size, cached_only=args.cached_only)
    gen_s = time.perf_counter() - t0
    cfg = TrainConfig(n_tokens=args.n_tokens, n_virtual=args.n_virtual, deep=args.deep, steps=args.steps,
                      time_budget=args.time_budget * 60 if args.time_budget else None,
                      cuts_per_step=args.batch_size, cuts_per_seq=args.cuts_per_seq, lr=args.lr,
                      repetition_penalty=args.repetition_penalty, seed=args.seed, train_dtype=args.train_dtype,
                      init="mean" if not args.init_from else f"file:{Path(args.init_from).name}")
    init_from = PromptTokens.load(args.init_from, lm.model) if args.init_from else None
    if args.train_dtype != "model":
        if args.train_dtype == "bfloat16" and lm.device.type == "cpu" and not native_bf16():
            print("[ppd] warning: this CPU has no native bf16 (AVX-512 BF16 / AMX); bf16 training steps run "
                  "~17x slower than float32 here (measured 204 s vs 12 s on an AVX2 EPYC): use --train-dtype "
                  "float32", file=sys.stderr)
        lm.model.to(DTYPES[args.train_dtype])
    out = Path(args.out)
    pt, log = train_prompt_tokens(lm.model, rows, cfg, eos_ids(lm.model, lm.tokenizer),
                                  ckpt=checkpoint_path(work, out, cfg), init_from=init_from)
    n_params = sum(p.numel() for p in lm.model.parameters())
    trained = {"how": cfg.variant, "data": f"{Path(args.prompts).name}: {len(rows)} replies written by the model "
               f"(greedy, repetition penalty {args.repetition_penalty}, max {args.max_new_tokens} new tokens)",
               "samples": len(rows), "steps": log["steps"], "cut_points": log["cut_points"],
               "seconds": round(log["seconds"], 1), "data_seconds_this_run": round(gen_s, 1),
               "config": cfg.__dict__, "final_loss": float(np.mean([h[1] for h in log["history"][-20:]])),
               "final_top1_agreement": float(np.mean([h[2] for h in log["history"][-20:]])),
               "parameter_overhead": pt.num_parameters / n_params}
    pt.save(out, base_model=lm.name, trained=trained)
    print(json.dumps({"out": str(out), **{k: v for k, v in trained.items() if k != "config"}}, indent=1))
    return 0


def run_eval_tokens(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .runtime import shipped_prompt_tokens
    from .tree import TreeSpec, build_tree, default_tree, expected_tokens_per_step

    lm = load_model(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization)
    path = Path(args.prompt_tokens) if args.prompt_tokens else shipped_prompt_tokens(args.model or DEFAULT_MODEL)
    if path is not None:
        pt = PromptTokens.load(path, lm.model)
    else:
        print("[ppd] no trained prompt tokens: scoring untrained (mean-embedding) ones", file=sys.stderr)
        pt = PromptTokens.init_for(lm.model, 3, how="mean")
    prompts = read_prompts(args.prompts)[: args.limit]
    cache = replies_cache_path(lm.model, args.prompts, args.max_new_tokens, args.repetition_penalty,
                               work_dir_for(args.work_dir))
    rows = generate_replies(lm.model, lm.tokenizer, prompts, cache, args.max_new_tokens, args.repetition_penalty,
                            args.gen_batch_size, max_prompt_tokens=10**9)
    t0 = time.perf_counter()
    counts, n_cuts = rank_hits(lm.model, pt, rows, eos_ids(lm.model, lm.tokenizer), args.top_k)
    acc = counts / max(1, n_cuts)
    n_params = sum(p.numel() for p in lm.model.parameters())
    result: dict = {"prompt_tokens": str(path) if path else None, "prompts": args.prompts, "n_prompts": len(rows),
                    "cut_points": n_cuts, "n_tokens": pt.n_tokens, "n_virtual": pt.n_virtual, "variant": pt.variant,
                    "parameter_overhead": pt.num_parameters / n_params, "rank_accuracy": acc.round(5).tolist(),
                    "topk_accuracy": np.cumsum(acc, 1).round(5).tolist(), "score_seconds": 0.0}
    result["score_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\nprompt tokens: {path or 'untrained'} ({pt.variant}, N={pt.n_tokens}, m={pt.n_virtual}); "
          f"{len(rows)} prompts, {n_cuts} cut points; parameter overhead {100 * result['parameter_overhead']:.4f} %")
    print(accuracy_table(acc))
    trees = {"default": TreeSpec.load(args.tree) if args.tree else default_tree(pt.n_tokens)}
    for b in (int(x) for x in args.budgets.split(",") if x):
        trees[f"built-{b}"] = build_tree(acc, b, pt.n_tokens)
    result["expected_tau"] = {name: round(expected_tokens_per_step(spec, acc), 4) for name, spec in trees.items()}
    print("expected acceptance length (tokens per forward): "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["expected_tau"].items()))
    if args.tau_prompts:
        tau_trees = {name: trees[name] for name in args.tau_trees.split(",") if name in trees}
        result["measured_tau"] = {}
        for name, spec in tau_trees.items():
            engine = Engine(lm, pt, spec)
            texts = [text for _, text in prompts[: args.tau_prompts]]
            result["measured_tau"][name] = measure_tau(engine, texts, args.tau_max_new_tokens,
                                                       args.repetition_penalty)
            print(f"measured tau, {name} tree ({spec.budget} rows): {result['measured_tau'][name]['tau']:.3f} "
                  f"on {len(texts)} prompts x {args.tau_max_new_tokens} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
