"""Run one generation replica.

    python -m services.generation --config run.yaml --model-dir DIR \\
        --scheduler HOST:PORT --reward-url http://HOST:PORT --replica-id gen-0 \\
        --http-port N [--max-tasks 64]

Unset flags fall back to the config (scheduler.host/grpc_port, reward.host/port,
generation.http_port, generation.max_tasks_per_lease, base_model). The bearer
token comes only from the config (auth.generation_token, E3_GENERATION_TOKEN),
never a flag, so it does not show up in process listings; without one it exits
2 at once, unless auth.insecure_loopback is set and the scheduler, the reward
service and --host are all loopback. With tls.ca_file it calls the scheduler
and the reward service over TLS (services.common.tls). SIGTERM or SIGINT: stop
leasing, submit the groups in flight, exit 0. A vLLM engine that dies: hand
the leased tasks back, log why, exit 1 (services.generation.worker).
"""

from __future__ import annotations

import argparse
import os
import asyncio
import signal
import sys
import zlib

import httpx

from e3.config import ConfigError, E3Config, load_config
from e3.contracts import e3_pb2_grpc as pb_grpc
from services.common.auth import SERVICE_ROLES, require_tokens
from services.common.runtime import setup_logging
from services.common.tls import grpc_channel, httpx_verify
from services.generation.engine import EngineDead, EngineSettings, GenerationEngine
from services.common.http_thread import HttpServerThread
from services.generation.http_api import create_app
from services.generation.metrics import GenerationMetrics, ReplicaState
from services.generation.worker import Replica, WorkerSettings

# Same limit as the scheduler's server: a large lease or group must not be cut off.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def replica_seed(run_seed: int, replica_id: str) -> int:
    """Distinct per replica: with one shared seed, two replicas given the same
    prompt in the same order would return the very same samples."""
    return (run_seed * 1_000_003 + zlib.crc32(replica_id.encode())) % (2**31)


async def serve(config: E3Config, args: argparse.Namespace, log) -> str:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s received: no new leases; finishing the groups in flight", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    state = ReplicaState()
    metrics = GenerationMetrics(args.replica_id)
    # Up before the engine, so /healthz answers (and /readyz says "not yet") while it starts.
    http_server = HttpServerThread(create_app(state, metrics), args.host, args.http_port, name="generation-http")
    http_server.start()
    gen = config.generation
    engine = GenerationEngine(EngineSettings.from_config(gen, replica_seed(config.training.seed, args.replica_id)))
    state.engine_failure = engine.failure  # /healthz fails from the moment the engine is dead
    channel = None
    try:
        start_s = engine.start(args.model_dir, version=args.policy_version)
        warm_s = await engine.warm_up()
        state.model_loaded, state.loaded_version = True, engine.loaded_version
        metrics.versions(engine.loaded_version, None)
        log.info("%s: engine started in %.1fs, warmed up in %.1fs", args.replica_id, start_s, warm_s)
        channel = grpc_channel(
            args.scheduler, config.tls, aio=True,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        settings = WorkerSettings(
            replica_id=args.replica_id, max_tasks=args.max_tasks, reward_url=args.reward_url, token=config.auth.generation_token,
            leases_in_flight=gen.leases_in_flight, lease_wait_s=gen.lease_wait_s,
            sampling_delay_s=config.fault.sampling_delay_s, samples_ahead=config.training.max_async_level > 0,
        )
        async with httpx.AsyncClient(verify=httpx_verify(config.tls)) as http:
            replica = Replica(engine, pb_grpc.SchedulerStub(channel), http, settings, metrics, state)
            try:
                return await replica.run(stop)
            except EngineDead as exc:
                log.error("%s: the vLLM engine died (%s); %d leased tasks handed back to the scheduler; exiting 1 "
                          "so that the replica is restarted", args.replica_id, exc, replica.handed_back)
                raise
    finally:
        if channel is not None:
            await channel.close()
        engine.shutdown()
        http_server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.generation", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (environment variables override it)")
    parser.add_argument("--model-dir", help="model directory loaded at start (default: the config's base_model)")
    parser.add_argument("--policy-version", type=int, default=0, help="the policy version --model-dir holds")
    parser.add_argument("--scheduler", help="scheduler gRPC address HOST:PORT")
    parser.add_argument("--reward-url", help="reward service base URL, e.g. http://127.0.0.1:8200")
    parser.add_argument("--replica-id", default=os.environ.get("HOSTNAME") or "gen-0",
                        help="unique per replica; labels its metrics and seeds its sampler (default: $HOSTNAME)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the health/metrics HTTP server")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--max-tasks", type=int, help="tasks asked for per lease")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    log = setup_logging(f"generation[{args.replica_id}]", args.log_level.upper())
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    args.model_dir = args.model_dir or config.base_model
    if not args.model_dir:
        parser.error("--model-dir is required when the config names no base_model")
    args.scheduler = args.scheduler or f"{config.scheduler.host}:{config.scheduler.grpc_port}"
    # With a CA bundle the servers this replica calls speak TLS (services.common.tls).
    args.reward_url = args.reward_url or f"{'https' if config.tls.ca_file else 'http'}://{config.reward.host}:{config.reward.port}"
    args.http_port = config.generation.http_port if args.http_port is None else args.http_port
    args.max_tasks = args.max_tasks or config.generation.max_tasks_per_lease
    if args.max_tasks < 1:
        parser.error(f"--max-tasks must be >= 1, got {args.max_tasks}")
    try:
        require_tokens(config.auth, SERVICE_ROLES["generation"], f"generation replica {args.replica_id}",
                       [args.host, args.scheduler, args.reward_url])
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    try:
        outcome = asyncio.run(serve(config, args, log))
    except EngineDead:
        sys.exit(1)  # logged by serve
    log.info("%s: exiting (%s)", args.replica_id, outcome)


if __name__ == "__main__":
    main()
