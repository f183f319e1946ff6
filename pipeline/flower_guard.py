"""Safe defaults for ``celery -A pipeline flower``: loopback only, and never open by accident.

Left to itself Flower listens on every interface and serves its UI (every task's arguments,
that is every dealer's domain, and the buttons that restart or shut down workers) to anyone who
connects: only its API asks for credentials. certman changes three defaults, before Flower reads
its options (tornado.options: ``FLOWER_*`` environment variables, then its ``--conf`` file,
then the command line, each able to override the one before):

- the address is 127.0.0.1 unless ``FLOWER_ADDRESS``, ``address`` in the conf file or
  ``--address`` says otherwise (behind a reverse proxy, or ``--address=0.0.0.0`` on purpose);
- the task list shows each task's arguments (``tasks_columns``; ``FLOWER_TASKS_COLUMNS`` or
  ``--tasks_columns`` override it), so that an issuance task shows its domain;
- Flower refuses to start, with one line saying how to fix it, unless it has credentials:
  ``FLOWER_BASIC_AUTH=user:password`` (or ``--basic-auth``), or OAuth (``--auth`` and
  ``--auth_provider``). ``FLOWER_UNAUTHENTICATED_API=true`` (Flower's own switch for an open
  API) is taken as the explicit choice to run it open on a trusted network.
"""

from __future__ import annotations

import sys

MESSAGE = (
    "certman: Flower has no authentication: set FLOWER_BASIC_AUTH=user:password "
    "(or --basic-auth=user:password, or OAuth with --auth), or FLOWER_UNAUTHENTICATED_API=true "
    "to run it open on a trusted network"
)


def install() -> None:
    """Change Flower's defaults if this process is the ``celery`` command with Flower loaded.

    The ``celery`` command imports every plugin command (Flower's among them) before it loads
    the app, so Flower's options are defined by the time this runs; a worker or ``certman`` that
    never loaded Flower is left alone (and does not pay for importing it).
    """
    if "flower.options" not in sys.modules:
        return
    from pathlib import Path

    from tornado.options import options

    options.address = "127.0.0.1"
    # The arguments column: an issuance task's arguments are its order and domain, what an
    # operator looks for in the list during a stuck order (Flower's default shows no args).
    options.tasks_columns = TASKS_COLUMNS
    # Flower parses the command line (running parse callbacks), then, if the conf file exists,
    # reads it and parses the command line again (running them again): decide only once
    # everything has been read.
    passes = {"seen": 0}

    def check() -> None:
        passes["seen"] += 1
        if Path(options.conf).is_file() and passes["seen"] == 1:
            return
        if options.basic_auth or options.auth or _open_on_purpose():
            return
        print(MESSAGE, file=sys.stderr)
        raise SystemExit(2)

    options.add_parse_callback(check)


def _open_on_purpose() -> bool:
    # Flower reads this variable itself, at each API request, rather than as an option.
    import os

    return os.environ.get("FLOWER_UNAUTHENTICATED_API", "").strip().lower() in TRUE


TRUE = {"1", "true", "t", "yes", "y", "on"}
TASKS_COLUMNS = "name,uuid,state,args,kwargs,received,runtime,worker"
