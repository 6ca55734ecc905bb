"""`python launch.py` (chat): command-line flags, model preparation, and launching the UI."""

from __future__ import annotations

import argparse
import secrets
import sys

import gradio as gr

from ppd_core.cpu_kernels import describe_packed

from .ui import CSS, ChatDefaults, build_ui


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1; 0.0.0.0 = reachable from the network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--share", action="store_true",
                   help="also ask Gradio for a temporary public link (needs internet; without --auth, "
                        "credentials are generated and printed)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login for the app")
    p.add_argument("--no-ppd", action="store_true", help="start with PPD switched off (plain greedy decoding)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default reply length limit (default 256)")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure the best tree for this machine again instead of using the cached choice")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth must look like USER:PASS")
    return user, password


def share_auth(share: bool, auth: tuple[str, str] | None) -> tuple[str, str] | None:
    """A public link must not be open to everyone: without --auth, make credentials and say so loudly."""
    if not share or auth is not None:
        return auth
    generated = ("ppd", secrets.token_urlsafe(9))
    bar = "=" * 72
    print(f"\n{bar}\n  --share without --auth: the public link is protected with generated credentials\n"
          f"    user: {generated[0]}\n    password: {generated[1]}\n"
          f"  (use --auth USER:PASS to choose your own)\n{bar}\n", flush=True)
    return generated


def launch_ui(demo: gr.Blocks, host: str, port: int | None, share: bool, auth: tuple[str, str] | None,
              block: bool = True) -> str | None:
    """Queue and launch; returns the public URL, or None. A failed share link is reported, not fatal."""
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, auth=auth, prevent_thread_lock=True,
                css=CSS, show_error=True, quiet=True)
    print(f"[ppd] chat running locally at {demo.local_url}", flush=True)
    if share:
        if demo.share_url:
            print(f"[ppd] public link: {demo.share_url}", flush=True)
        else:
            print("[ppd] could not create the public share link (no internet access, or the Gradio share "
                  f"server is unreachable). The app keeps serving locally at {demo.local_url}", flush=True)
    if block:
        demo.block_thread()
    return demo.share_url


def run_chat(args: argparse.Namespace) -> int:
    from ppd_core.runtime import build_engine

    auth = parse_auth(args.auth)  # checked before the slow model load
    print("[ppd] loading the model and prompt tokens; the first run also prepares the default model "
          "and calibrates the tree for this machine, which takes several minutes…", flush=True)
    engine = build_engine(args.model, args.dtype, args.device, args.quantization, args.prompt_tokens, args.tree,
                          recalibrate=args.recalibrate)
    packed = describe_packed(engine.packed_weights)
    print(f"[ppd] model ready: {engine.lm.name} on {engine.lm.device} ({engine.precision}"
          f"{f'; matmuls read {packed} blocks, exactly' if packed else ''}), "
          f"tree of {engine.tree.budget} nodes; starting the web app…", flush=True)
    defaults = ChatDefaults(max_new_tokens=args.max_new_tokens, ppd=not args.no_ppd)
    demo = build_ui(engine, defaults)
    auth = share_auth(args.share, auth)  # printed here so the credentials sit next to the URLs
    try:
        launch_ui(demo, args.host, args.port, args.share, auth)
    except OSError as exc:  # port taken, bad host
        print(f"error: could not start the web server: {exc}", file=sys.stderr)
        return 2
    return 0
