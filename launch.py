#!/usr/bin/env python
"""PPD Chat. `python launch.py` opens the chat; sub-commands run the rest (see --help)."""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder, .gguf file or hub id (default: SmolLM2-135M-Instruct, prepared on first use)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = fastest dtype that stays lossless on this device")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--quantization", default=None, choices=["8bit", "4bit"], help="load through bitsandbytes")
    p.add_argument("--prompt-tokens", default=None, help="prompt-token file (default: the one shipped for the model)")
    p.add_argument("--tree", default=None, help="tree spec JSON (default: built-in tree)")


def run_bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from ppd_core.cpu_kernels import kernel_isa, time_linears
    from ppd_core.models import load_model

    lm = load_model(args.model, args.dtype, args.device, args.quantization)
    weights = [m.weight for m in lm.model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    print(f"{lm.name}, {lm.precision}: {len(weights)} decoder weight matrices, "
          f"ms for all of them (best of 7); kernel: {kernel_isa()}\n")
    results = time_linears(weights)
    print("| rows | " + " | ".join(k for k in results[0] if k != "rows") + " |")
    print("|---" * len(results[0]) + "|")
    for r in results:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    chat = sub.add_parser("chat", help="open the chat in the browser (the default)")
    add_model_args(chat)
    from app.chat import add_chat_args

    add_chat_args(chat)

    bench = sub.add_parser("bench", help="measure plain vs PPD decoding side by side")
    add_model_args(bench)
    from ppd_core.bench import add_bench_args

    add_bench_args(bench)

    calibrate = sub.add_parser("calibrate", help="measure and cache the best tree for this machine")
    add_model_args(calibrate)
    from ppd_core.calibrate import add_calibrate_args

    add_calibrate_args(calibrate)

    train = sub.add_parser("train", help="train prompt tokens for a model by self-distillation")
    add_model_args(train)
    evaluate = sub.add_parser("eval-tokens", help="accuracy of prompt tokens per depth and rank, on held-out prompts")
    add_model_args(evaluate)
    from ppd_core.train import add_eval_args, add_train_args

    add_train_args(train)
    add_eval_args(evaluate)

    kernels = sub.add_parser("bench-kernels", help="time the model's decoder matmuls: MKL vs the CPU kernel, by rows")
    add_model_args(kernels)

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["chat", *argv]
    args = parser.parse_args(argv)
    from ppd_core.models import ModelError
    from ppd_core.prompt_tokens import PromptTokenError

    try:
        if args.command == "bench":
            from ppd_core.bench import run_bench

            return run_bench(args)
        if args.command == "bench-kernels":
            return run_bench_kernels(args)
        if args.command == "calibrate":
            from ppd_core.calibrate import run_calibrate

            return run_calibrate(args)
        if args.command == "train":
            from ppd_core.train import run_train

            return run_train(args)
        if args.command == "eval-tokens":
            from ppd_core.train import run_eval_tokens

            return run_eval_tokens(args)
        from app.chat import run_chat

        return run_chat(args)
    except (ModelError, PromptTokenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
