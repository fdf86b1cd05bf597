"""``bgert serve ART [ART ...]``: OpenAI-, TEI- and Cohere/Jina-compatible HTTP endpoints (bgert.server).

The server listens at once; ``/health`` answers 503 until every model is loaded and warmed up.
SIGTERM (or Ctrl-C) stops admission, finishes the requests in flight, then exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("artifacts", nargs="+", metavar="ART", help="artifact directories (from `bgert export`)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="name of each artifact, once per artifact in order (default: its directory name)")
    p = parser.add_argument_group("server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=os.environ.get("BGERT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $BGERT_API_KEY, else none)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p = parser.add_argument_group("batching and limits")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per batch run at most (rows x length bucket); the largest batch sets the "
                        "peak memory (default: the model's token budget, 4096 on the CPU, 16384 on GPUs)")
    p.add_argument("--max-batch-requests", type=int, default=256, help="inputs per batch run at most (default 256)")
    p.add_argument("--max-client-batch-size", type=int, default=512,
                   help="inputs per HTTP request at most (default 512)")
    p.add_argument("--max-request-bytes", type=int, default=2_000_000,
                   help="request body size at most (default 2,000,000)")
    p.add_argument("--max-queue-items", type=int, default=10_000,
                   help="inputs waiting per model at most; past it requests get 429 (default 10,000)")
    p.add_argument("--max-batch-wait-ms", type=float, default=0.0,
                   help="how long the oldest request may wait for its batch to fill (default 0: batches fill "
                        "while the previous one runs)")
    p = parser.add_argument_group("models")
    p.add_argument("--precision", default=None, help="graph precision (default: the best that passed its gate)")
    p.add_argument("--providers", default=None, help="ORT execution providers, e.g. cuda or cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per lane (default: ORT's with one lane, cores / --lanes with more)")
    p.add_argument("--lanes", type=int, default=None,
                   help="workers running batches side by side per model, sharing its session (default 1; "
                        "on the CPU each lane gets cores / N threads unless --threads says)")
    p.add_argument("--tokenizer-workers", type=int, default=None, help="tokenising threads per model (default: 4)")
    p.add_argument("--arena", default="on", choices=["on", "shrink", "off"],
                   help="ORT's CPU memory arena: on (keeps what the largest batch needed), shrink (an idle server "
                        "gives its activation memory back after every batch), off (plain malloc per tensor)")
    p = parser.add_argument_group("inputs, outputs and tracing")
    p.add_argument("--auto-truncate", action=argparse.BooleanOptionalAction, default=True,
                   help="cut inputs longer than a model's max length (as TEI does; default on); "
                        "--no-auto-truncate refuses them with 413. A request's own truncate wins")
    p.add_argument("--int8-calibration", metavar="FILE", default=None,
                   help="texts (one per line, like the corpus) whose vectors calibrate int8/uint8 output at "
                        "start-up (default: the ranges the artifact's export calibrated)")
    p.add_argument("--otlp-endpoint", metavar="URL", default=None,
                   help="export OpenTelemetry traces over OTLP/HTTP to URL/v1/traces (default: "
                        "$OTEL_EXPORTER_OTLP_ENDPOINT, else off); needs the otel extra")
    p.add_argument("--otlp-service-name", default=None,
                   help="service.name of the traces (default: $OTEL_SERVICE_NAME, else bgert)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from bgert.server.app import ServerOptions, ServerState, Served, create_app
    except ImportError as e:
        raise RuntimeError(f"bgert serve needs the serve extra ({e}); pip install 'bgert[serve]'") from e
    names = args.name or [os.path.basename(os.path.normpath(a)) for a in args.artifacts]
    if len(names) != len(args.artifacts):
        raise ValueError(f"--name was given {len(args.name)} times for {len(args.artifacts)} artifacts; "
                         "give it once per artifact, in order, or not at all")
    if len(set(names)) != len(names):
        raise ValueError(f"two artifacts have the same name ({', '.join(names)}); tell them apart with --name")
    if args.int8_calibration is not None and not os.path.isfile(args.int8_calibration):
        raise FileNotFoundError(f"--int8-calibration {args.int8_calibration} is not a file (texts, one per line)")
    for a in args.artifacts:
        if not os.path.isdir(a):
            raise FileNotFoundError(f"{a} is not a directory; make one with `bgert export CHECKPOINT --out DIR`")
    options = ServerOptions(max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
                            max_client_batch_size=args.max_client_batch_size,
                            max_request_bytes=args.max_request_bytes, max_queue_items=args.max_queue_items,
                            api_key=args.api_key or None, tokenizer_workers=args.tokenizer_workers,
                            lanes=args.lanes, max_wait_ms=args.max_batch_wait_ms,
                            auto_truncate=args.auto_truncate, int8_calibration=args.int8_calibration,
                            otlp_endpoint=args.otlp_endpoint, otlp_service_name=args.otlp_service_name)
    load_kwargs = {k: v for k, v in (("precision", args.precision), ("providers", args.providers),
                                     ("intra_op_num_threads", args.threads)) if v is not None}
    if args.arena != "on":
        load_kwargs["arena"] = args.arena
    state = ServerState([Served(n, a) for n, a in zip(names, args.artifacts)], options, load_kwargs)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                           log_level=args.log_level, access_log=False, lifespan="off"))
    loader = threading.Thread(target=_load, args=(state, server), daemon=True, name="bgert-serve-load")
    print(f"bgert serve: http://{args.host}:{args.port} ({', '.join(names)}; /health says when ready)",
          file=sys.stderr)
    loader.start()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the handler that
    # was there before; a no-op one lets this return 0 (in-flight requests done, queues closed below)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        state.close()  # every queued request finishes before the process ends
    return 1 if state.error else 0


def _load(state, server) -> None:  # noqa: ANN001 (ServerState, uvicorn.Server: imported lazily)
    state.load_all()
    if state.error:
        server.should_exit = True
