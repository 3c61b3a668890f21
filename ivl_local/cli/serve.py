"""`ivl serve`: the composition behind an OpenAI-compatible HTTP endpoint (ivl_local/server.py).

    ivl serve --base gemma3-270m --value my.ivl.gguf            # http://127.0.0.1:8080/v1
    ivl serve --value none --slots 2 --api-key "$KEY" --port 9000
    ivl serve --draft ngram                                      # speculative decoding, same output

Takes `ivl chat`'s composition flags (--value PATH[:WEIGHT], --expert/--anti-expert, --cfg-scale,
--amateur, ...) and its speculative decoding (--draft, --draft-max), checked before anything
loads. Needs the `serve` extra (FastAPI, uvicorn, sse-starlette).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from typing import Annotated, Optional

import typer

from ..config import EngineConfig, check_seed, default_threads
from ..errors import ConfigError, IVLError
from ._common import EXIT_INTERRUPTED, one_line_warnings, print_error, print_note, user_errors
from .chat import (DEFAULT_BASE, DEFAULT_CTX, AlphaOption, AmateurOption, AntiExpertOption, BaseOption,
                   CandidatesKOption, CdAlphaOption, CdBetaOption, CfgScaleOption, Composition, CtxOption,
                   DebugOption, DraftMaxOption, DraftOption, ExpertOption, MapModeOption, MapOption,
                   NegativePromptOption, ProxyWeightOption, ThreadsOption, ValueOption, ValuePromptOption,
                   check_draft_flag)

DEFAULT_MAX_TOKENS = 1024
SLOTS_MAX = 64
QUEUE_MAX = 10_000
CONNECTION_HEADROOM = 32   # connections beyond slots + queue (health checks, 503 answers)


def _missing_extra() -> str | None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"ivl serve needs the 'serve' extra ({', '.join(missing)} missing): "
                f"{sys.executable} -m pip install 'ivl-local[serve]'")
    return None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so --port 0 picks a free port that we can print)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    base: BaseOption = DEFAULT_BASE,
    value: ValueOption = None,
    expert: ExpertOption = None,
    anti_expert: AntiExpertOption = None,
    proxy_weight: ProxyWeightOption = None,
    cfg_scale: CfgScaleOption = None,
    negative_prompt: NegativePromptOption = None,
    amateur: AmateurOption = None,
    cd_beta: CdBetaOption = None,
    cd_alpha: CdAlphaOption = None,
    alpha: AlphaOption = None,
    token_map: MapOption = None,
    value_prompt: ValuePromptOption = "own",
    map_mode: MapModeOption = "raw",
    candidates_k: CandidatesKOption = 8,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback is reachable from "
                                           "other machines: give it an --api-key.", rich_help_panel="Server")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one, printed at start).", rich_help_panel="Server")] = 8080,
    slots: Annotated[int, typer.Option(help="Requests generated at once; each slot has its own contexts, the "
                                            "weights are shared.", rich_help_panel="Server")] = 1,
    queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; more get 503 with Retry-After.",
                                       rich_help_panel="Server")] = 16,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="IVL_API_KEY", help="Require 'Authorization: Bearer KEY' (also from $IVL_API_KEY, which other "
        "users cannot read in the process list).", rich_help_panel="Server")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        help="Allow browser pages from this origin (repeatable; '*' for any). Default: no CORS.",
        rich_help_panel="Server")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        help="The most tokens a request may ask for (and the default). Default: 1024 or --ctx if smaller.",
        rich_help_panel="Limits")] = None,
    max_messages: Annotated[int, typer.Option(help="The most messages in one chat request.",
                                              rich_help_panel="Limits")] = 256,
    max_body: Annotated[int, typer.Option(help="The largest request body, in bytes.", rich_help_panel="Limits")] = 1 << 20,
    model_id: Annotated[Optional[str], typer.Option(help="The model name clients use (default: base+value file "
                                                         "names).", rich_help_panel="Server")] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="At Ctrl-C / SIGTERM: seconds the running requests may take "
                                                         "to finish before they are cancelled.",
                                                    rich_help_panel="Server")] = 10.0,
    seed: Annotated[int, typer.Option(help="Seed of requests that give none (slot i starts at seed + i * 2^24, "
                                           "so requests running at once on two slots draw apart).",
                                      rich_help_panel="Resources")] = 0,
    ctx: CtxOption = DEFAULT_CTX,
    threads: ThreadsOption = None,
    draft: DraftOption = None,
    draft_max: DraftMaxOption = 8,
    debug: DebugOption = False,
    verbose: Annotated[bool, typer.Option(help="llama.cpp's log and every request on stderr.")] = False,
) -> None:
    """Serve the composition over an OpenAI-compatible HTTP API (/v1/chat/completions, ...)."""
    try:
        _serve(**locals())
    except KeyboardInterrupt:   # Ctrl-C while the models load
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _serve(*, base, value, expert, anti_expert, proxy_weight, cfg_scale, negative_prompt, amateur, cd_beta,
           cd_alpha, alpha, token_map, value_prompt, map_mode, candidates_k, host, port, slots, queue, api_key,
           cors_origin, max_tokens, max_messages, max_body, model_id, shutdown_timeout, seed, ctx, threads, draft,
           draft_max, debug, verbose) -> None:
    engines: list = []
    with user_errors(debug), one_line_warnings():
        missing = _missing_extra()
        if missing:
            raise ConfigError(missing)
        # Everything cheap first: a typo fails in milliseconds, not after loading models.
        check_seed(seed, "--seed")
        max_tokens = min(DEFAULT_MAX_TOKENS, ctx) if max_tokens is None else max_tokens
        for name, number, low, high in (("--slots", slots, 1, SLOTS_MAX), ("--queue", queue, 0, QUEUE_MAX),
                                        ("--max-tokens", max_tokens, 1, ctx), ("--max-messages", max_messages, 1, 1 << 20),
                                        ("--max-body", max_body, 1024, 1 << 30), ("--port", port, 0, 65535)):
            if not low <= number <= high:
                raise ConfigError(f"{name} must be between {low} and {high:,}, got {number}")
        if not shutdown_timeout >= 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
        if api_key is not None and not api_key.strip():
            raise ConfigError("--api-key is empty")
        total_threads = threads or default_threads()
        EngineConfig(n_ctx=ctx, n_threads=total_threads, draft_max=draft_max)
        draft = check_draft_flag(draft)
        speculative = {} if draft is None else dict(draft=draft, draft_max=draft_max)
        per_slot = max(1, total_threads // slots)   # slots decode at once: share the cores
        composition = Composition.check(value, alpha, token_map, value_prompt, map_mode, candidates_k, draft)
        composition.resolve(base, expert, anti_expert, proxy_weight, cfg_scale, negative_prompt, amateur,
                            cd_beta, cd_alpha, prepare_default=False)
        sock = _bind(host, port)

        import uvicorn

        from ..engine import Engine
        from ..registry import ModelRegistry
        from ..server import ServerLimits, create_app, slot_seed

        try:
            models = ModelRegistry()
            for i in range(slots):
                engines.append(Engine(composition.base, composition.value, composition.alpha, n_ctx=ctx,
                                      n_threads=per_slot, seed=slot_seed(seed, i), verbose=verbose, models=models,
                                      **composition.engine_kwargs(), **speculative))
            limits = ServerLimits(queue=queue, api_key=api_key, cors_origins=list(cors_origin or []),
                                  max_body_bytes=max_body, max_messages=max_messages, max_tokens=max_tokens,
                                  model_id=model_id, shutdown_grace_s=shutdown_timeout)
            app = create_app(engines, limits)
        except BaseException:
            for engine in engines:
                engine.close()
            sock.close()
            raise
    address = sock.getsockname()
    url_host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
    print_note(f"ivl serve: {app.state.composition.model_id} on http://{url_host}:{address[1]}/v1 "
               f"({slots} slot{'s' * (slots > 1)} x {per_slot} thread{'s' * (per_slot > 1)}, queue {queue}"
               f"{f', drafts: {engines[0].draft}' if engines[0].draft else ''}"
               f"{', API key required' if api_key else ''})")
    if not _is_loopback(host) and api_key is None:
        print_note(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it")
    # the app cancels what still runs after --shutdown-timeout and every response ends cleanly;
    # uvicorn's own cut (of connections still open) comes later, as a backstop
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=shutdown_timeout + 5, lifespan="on", server_header=False,
                            # open connections are capped (uvicorn answers 503 past it): each may
                            # buffer a body of up to --max-body, so without a cap a local client
                            # could exhaust memory; the headroom serves /health and the 503s
                            limit_concurrency=slots + queue + CONNECTION_HEADROOM)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with these
    # handlers in place that is a no-op and the command exits 0 after freeing everything.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except IVLError as e:
        print_error(str(e))
        raise typer.Exit(e.exit_code) from None
    finally:
        from ..server import shutdown

        shutdown(None, engines)   # the app's shutdown did this already, unless forced (Ctrl-C twice)
        sock.close()
    print_note("ivl serve: stopped")
