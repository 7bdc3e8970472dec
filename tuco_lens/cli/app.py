"""``tuco-lens app``: the interactive local page (Gradio), for the demo pair or a real one.

Nothing heavy is imported until the command runs: building the parser (``--help``) imports
neither torch nor Gradio.
"""

from __future__ import annotations

import argparse

from tuco_lens.cli.common import add_command, add_model_arguments

__all__ = ["add_parser", "run"]

_EPILOG = """\
The page has three views: Analyze (TuCo of a prompt, its tokens coloured by per-token TuCo,
per-layer and layer x token figures), Steer (generations at alpha = 0, a chosen alpha and
alpha = 1) and Compare (TuCo distributions and ROC AUC of two prompt lists). The pair is loaded
once; requests run one at a time. The API endpoints /analyze and /steer answer gradio_client.

It binds to 127.0.0.1 (this machine only) unless --host says otherwise, never asks for a public
share link, turns Gradio's usage analytics off and needs no internet. Needs the app extra:
  pip install "tuco_lens[app]"

examples:
  tuco-lens app --demo                                      # then open http://127.0.0.1:7860
  tuco-lens app --pt meta-llama/Llama-2-7b-hf --ft meta-llama/Llama-2-7b-chat-hf \\
      --chat-template --dtype bfloat16 --device cuda
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "app", run,
        description="Serve an interactive page (Gradio) for one model pair, on this machine.", epilog=_EPILOG,
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--chat-template", action="store_true",
                        help="tick the chat-template boxes by default (wrap prompts in the fine-tuned chat template)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tuco_lens.app import require_gradio
    from tuco_lens.cli.common import CLIError, load_pair_from_args

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}")
    require_gradio()  # before the (possibly long) model loading
    pair = load_pair_from_args(args)
    from tuco_lens.app.defaults import AppDefaults
    from tuco_lens.app.server import serve

    defaults = AppDefaults.for_demo() if args.demo else AppDefaults()
    if args.chat_template:
        defaults = replace(defaults, chat_template=True, compare_chat_template=True)
    try:
        running = serve(pair, host=args.host, port=args.port, defaults=defaults)
    except OSError as error:
        raise CLIError(f"cannot serve on {args.host}:{args.port} ({error}); choose another --port") from None
    print(f"tuco-lens app: serving {pair!r} on {running.url} (Ctrl+C to stop)", flush=True)
    running.wait()
    return 0
