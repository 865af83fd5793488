"""Run the scheduler: gRPC for work, HTTP for state, in one process.

    python -m services.scheduler --config run.yaml [--http-port N] [--grpc-port N]

A configuration, data set or store that cannot be used stops it at once
with one line naming the culprit (exit code 2), not a traceback; so does a
missing auth.generation_token, auth.trainer_token or auth.operator_token,
unless auth.insecure_loopback is set and it binds loopback only.
SIGTERM: stop taking calls, end waiting lease and batch calls (they answer
UNAVAILABLE, clients ask again), give in-flight ones 5 s, release the
leader lease, close the store, exit 0.

Before serving, the scheduler takes the run's leader lease in the store
(services.scheduler.leadership), waiting while another scheduler holds it.
A scheduler that loses the run (another one fenced it out, or the store
went back past what the trainer trained: services.scheduler.reconcile)
halts, stops as on SIGTERM and exits 3 with the reason as its last line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from e3 import failpoints
from e3.config import ConfigError, load_config
from e3.store import SnapshotError, StoreFenced, StoreUnavailable, open_store
from e3.tasks.question import DatasetError
from e3.tasks.datasets import load_split
from services.common.auth import SERVICE_ROLES, RoleTokens, require_tokens
from services.common.runtime import model_vocab_size, serve_http, setup_logging
from services.common.tls import uvicorn_options
from services.scheduler.engine import SchedulerEngine, SchedulerError
from services.scheduler.grpc_api import start_grpc_server
from services.scheduler.http_api import create_app
from services.scheduler.leadership import LeaderKeeper, holder_name, take_run
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.prompt_limits import PromptTooLong, check_dataset


HALTED_EXIT = 3  # the scheduler stopped acting on its run; the reason is logged


def main(argv: list[str] | None = None) -> None:
    try:
        halted = serve(argv)
    except (ConfigError, DatasetError, PromptTooLong, SnapshotError, StoreUnavailable) as exc:
        setup_logging("scheduler").error("cannot start: %s", exc)
        sys.exit(2)
    except SchedulerError as exc:  # the store changed under the start-up itself
        setup_logging("scheduler").error("halted at start: %s", exc)
        sys.exit(HALTED_EXIT)
    if halted:
        setup_logging("scheduler").error("halted: %s", halted)
        sys.exit(HALTED_EXIT)


def serve(argv: list[str] | None = None) -> str | None:
    """Serve until SIGTERM (None) or until the engine halts (its reason)."""
    parser = argparse.ArgumentParser(prog="python -m services.scheduler", description=__doc__)
    parser.add_argument("--config", help="YAML config file (environment variables override it)")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--vocab-size", type=int, help="default: read from the base model's config.json")
    args = parser.parse_args(argv)

    log = setup_logging("scheduler")
    config = load_config(args.config)
    failpoints.arm(config.fault)
    sc = config.scheduler
    require_tokens(config.auth, SERVICE_ROLES["scheduler"], "scheduler", [sc.host])
    tokens = RoleTokens.from_config(config.auth)
    http_port = sc.http_port if args.http_port is None else args.http_port
    grpc_port = sc.grpc_port if args.grpc_port is None else args.grpc_port
    if args.vocab_size is None and not config.base_model:
        parser.error("--vocab-size is required when the config names no base_model")
    vocab_size = args.vocab_size or model_vocab_size(config.base_model)

    train = load_split(config.data, "train", base_dir=Path.cwd())
    # Validation tasks are sampled by the replicas (services.scheduler.validation).
    valid = load_split(config.data, "valid", base_dir=Path.cwd()) if config.validation_questions != 0 else []
    check_dataset(config, {"train": train, "valid": valid[: config.validation_questions]})  # before anything is planned
    store = open_store(sc.store_url, namespace=sc.run_id, **sc.store_options())
    stop = threading.Event()  # set on shutdown: the sweeper and keeper end, waiting StreamBatch calls return
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # while waiting for the run; uvicorn takes over later
    if take_run(store, holder_name(), sc.leader_lease_s, stop) is None:
        store.close()
        return None
    metrics = SchedulerMetrics()
    engine = SchedulerEngine(config, train, store, vocab_size, initial_weights_path=config.base_model or "", observer=metrics,
                             valid=valid)
    metrics.bind(engine)
    # A halt stops the process as SIGTERM does: uvicorn returns, the clean-up below runs.
    engine.on_halt = lambda reason: os.kill(os.getpid(), signal.SIGTERM)
    server, bound = start_grpc_server(engine, sc.host, grpc_port, tokens, stopping=stop, tls=config.tls)
    view = engine.snapshot()
    log.info("gRPC on %s:%d, store %s, %d training questions; at step %d, T %.6g, policy v%d, %d queued, %d leased",
             sc.host, bound, sc.store_url.split("@")[-1], len(train), view["step"], view["temperature"],
             view["policy_version"], view["queue_depth"], view["leased_tasks"])

    def expire_loop() -> None:
        # Leases also expire lazily on every lease call; this keeps the queue
        # honest when no replica is asking (e.g. all of them died).
        while not stop.wait(1.0):
            try:
                engine.expire_leases()
            except StoreFenced as exc:  # another scheduler holds the run, or the store went back
                engine.halt(str(exc))
                return
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the sweeper
                log.exception("lease sweep failed")

    threading.Thread(target=expire_loop, name="lease-sweeper", daemon=True).start()
    LeaderKeeper(store, engine, sc.leader_lease_s, stop).start()
    app = create_app(engine, metrics, tokens=tokens, read_open=config.api_read_open)
    try:
        if not stop.is_set():  # a SIGTERM or a halt during start-up
            serve_http(app, sc.host, http_port, **uvicorn_options(config.tls))
    finally:
        stop.set()
        engine.close()
        server.stop(grace=5).wait()
        if not engine.halted:
            store.release_leadership()  # a successor need not wait for the lease to run out
        store.close()
        log.info("stopped at step %d", engine.step)
    return engine.halted


if __name__ == "__main__":
    main()
