"""The Celery app: ``celery -A pipeline worker|beat|flower`` finds ``app`` here by itself."""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

CONFIG_PATH = Path(
    os.environ.get(
        "CERTMAN_CELERY_CONFIG", Path(__file__).resolve().parent.parent / "celery.conf.py"
    )
)


def _load_config(path: Path) -> SimpleNamespace:
    values = runpy.run_path(str(path))
    return SimpleNamespace(**{k: v for k, v in values.items() if not k.startswith("_")})


app = Celery("certman", include=["pipeline.tasks.issuance", "pipeline.tasks.maintenance"])
app.config_from_object(_load_config(CONFIG_PATH))


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Connections and ACME clients made before the fork must not be shared with the parent.
    from pipeline import acme_client, connections, db

    db.dispose_engines()
    connections.reset()
    acme_client.reset()
