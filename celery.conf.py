"""The Celery configuration an operator reads and overrides.

``pipeline/celery.py`` loads this file by path when certman runs from a checkout, and any other
file named by ``CERTMAN_CELERY_CONFIG`` (e.g. ``/etc/certman/celery.conf.py`` next to an
installed wheel). It starts from the defaults the package carries (``pipeline/celeryconfig.py``:
JSON only, acks late, the three queues, beat's schedule); assign any Celery setting below to
change it. (It cannot be imported as ``celery.conf``: that name is inside the celery package.)
"""

from __future__ import annotations

from pipeline.celeryconfig import *  # noqa: F403 (every default, then the overrides below)

# Examples (uncomment to use):
# from datetime import timedelta
# beat_schedule["dispatch"]["schedule"] = timedelta(seconds=5)
# worker_send_task_events = False  # Flower then sees a worker only while it is open
