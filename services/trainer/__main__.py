"""Run the trainer until the scheduler says the run is finished.

    python -m services.trainer --config run.yaml --scheduler HOST:PORT [--http-port N]

    torchrun --nproc-per-node=N -m services.trainer --config run.yaml --scheduler HOST:PORT

Under torchrun every rank runs this; rank 0 alone serves HTTP and talks to
the scheduler (services.trainer.loop).

The trainer calls the scheduler with auth.trainer_token (E3_TRAINER_TOKEN),
over TLS when tls.ca_file is set; with no token it refuses to start unless
auth.insecure_loopback is set and --scheduler and --host are loopback.

Exit codes: 0 finished, or stopped by SIGTERM after finishing (training,
checkpointing and reporting) the step in hand; 2 a configuration (a missing
token included), device or data set that cannot be used; 3 training cannot go on (too many
non-finite steps, a newer trainer registered for the run, a publish or checkpoint that could not be
written, e.g. a full disk).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from e3.config import ConfigError, load_config
from e3.model.loading import ModelDirError
from e3.tasks.question import DatasetError
from e3.train.parallel import DeviceError
from services.common.auth import SERVICE_ROLES, require_tokens
from services.common.http_thread import HttpServerThread
from services.common.runtime import setup_logging, stop_event_on_signals
from services.trainer.disk import WriteFailed
from services.trainer.http_api import create_app
from services.trainer.loop import Trainer, TrainingStopped
from services.trainer.metrics import TrainerMetrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer", description=__doc__)
    parser.add_argument("--config", help="YAML config file (environment variables override it)")
    parser.add_argument("--scheduler", required=True, help="scheduler gRPC address HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1", help="bind address of /healthz, /readyz and /metrics")
    parser.add_argument("--http-port", type=int, help="port for /healthz, /readyz, /metrics (default: config trainer.http_port)")
    args = parser.parse_args(argv)

    log = setup_logging("trainer")
    try:
        config = load_config(args.config)
        require_tokens(config.auth, SERVICE_ROLES["trainer"], "trainer", [args.host, args.scheduler])
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    if not config.base_model:
        parser.error("the config must name base_model (the launcher fills it in)")
    stop = stop_event_on_signals()
    metrics = TrainerMetrics()
    port = config.trainer.http_port if args.http_port is None else args.http_port
    status = {"ready": False}
    # torchrun's rank: only rank 0 answers HTTP (probes, metrics) for the job.
    http = None
    if os.environ.get("RANK", "0") == "0":
        http = HttpServerThread(create_app(metrics, status), args.host, port, name="trainer-http")
        http.start()
    try:
        trainer = Trainer(config, Path(config.base_model), args.scheduler, metrics=metrics, status=status)
        trainer.run(stop)
    except (DatasetError, DeviceError, ModelDirError, FileNotFoundError) as exc:  # bad config, device, model, checkpoint
        log.error("cannot start: %s", exc)
        return 2
    except (TrainingStopped, WriteFailed) as exc:  # e.g. superseded by a newer trainer, or a full disk
        log.error("training stopped: %s", exc)
        return 3
    finally:
        if http is not None:
            http.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
