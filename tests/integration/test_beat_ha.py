"""Two beats, one scheduling: the standby takes over when the active one is killed, and no
interval's dispatch is sent twice.

No worker: the dispatch messages stay in the ``maintenance`` queue (a Redis list), where the
test reads each one's id and its ``origin`` header (``gen<pid>@host``: which beat sent it), and
notes when it first saw it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.ports import wait_until
from tests.support.redis_server import RedisServer
from tests.support.system import BIN

pytestmark = pytest.mark.integration

INTERVAL = 1.0  # the dispatch entry's schedule here (15 s in production)
LOCK_TIMEOUT = 3  # CERTMAN_BEAT_LOCK_TIMEOUT here (30 s by default)
PREFIX = "beatha"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


class Dispatches:
    """Every dispatch message in the queue: (first seen, sender's pid), in the order sent.

    A thread reads the queue every 20 ms for as long as the test runs, so that when a message
    was first seen is when it was sent, give or take that."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for raw in self.client.lrange("maintenance", 0, -1):
                headers = json.loads(raw)["headers"]
                if headers["task"] != "certman.maintenance.dispatch":
                    continue
                with self._lock:
                    if headers["id"] not in self._seen:
                        pid = int(headers["origin"].removeprefix("gen").split("@", 1)[0])
                        self._seen[headers["id"]] = (time.monotonic(), pid)

    def __enter__(self) -> Dispatches:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()

    def sent(self) -> list[tuple[float, int]]:
        with self._lock:
            return sorted(self._seen.values())

    def wait_for(
        self, predicate: Callable[[list[tuple[float, int]]], bool], *, timeout: float, what: str
    ) -> None:
        wait_until(lambda: predicate(self.sent()), timeout=timeout, what=what, every=0.02)


def test_standby_beat_takes_over_without_doubling_a_dispatch(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    client = private_redis.start()
    config = tmp_path / "celery.conf.py"
    config.write_text(
        "from datetime import timedelta\n"
        "from pipeline.celeryconfig import *  # noqa: F403\n"
        "beat_schedule = {'dispatch': {'task': 'certman.maintenance.dispatch',\n"
        f"                             'schedule': timedelta(seconds={INTERVAL})}}}}\n"
    )
    env = dict(os.environ) | {
        "CERTMAN_DATA_DIR": str(tmp_path),
        "CERTMAN_REDIS_URL": private_redis.url,
        "CERTMAN_REDIS_PREFIX": PREFIX,
        "CERTMAN_CELERY_CONFIG": str(config),
        "CERTMAN_BEAT_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
    }
    beats: list[subprocess.Popen[bytes]] = []

    def start_beat(index: int) -> subprocess.Popen[bytes]:
        with (tmp_path / f"beat{index}.log").open("ab") as log:
            beat = subprocess.Popen(
                [str(BIN / "celery"), "-A", "pipeline", "beat", "-l", "debug"],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        beats.append(beat)
        return beat

    try:
        with Dispatches(private_redis.url) as dispatches:
            active = start_beat(0)
            dispatches.wait_for(
                lambda d: len(d) >= 1, timeout=30, what="the first beat to dispatch"
            )
            assert client.exists(f"{PREFIX}:redbeat:lock")
            standby = start_beat(1)
            # The standby is up, and waiting for the lock, once it has logged its start.
            wait_until(
                lambda: "beat: Starting" in (tmp_path / "beat1.log").read_text(errors="replace"),
                timeout=30,
                what="the second beat to start",
            )
            count = len(dispatches.sent())
            dispatches.wait_for(
                lambda d: len(d) >= count + 3, timeout=10 * INTERVAL, what="three more dispatches"
            )
            assert {pid for _, pid in dispatches.sent()} == {active.pid}, "one beat dispatches"

            killed_at = time.monotonic()
            active.send_signal(signal.SIGKILL)  # no chance to release its lock
            active.wait(timeout=10)
            dispatches.wait_for(
                lambda d: any(pid == standby.pid for _, pid in d),
                timeout=LOCK_TIMEOUT + 15,
                what="the standby beat to take over",
            )
            first_standby = min(t for t, pid in dispatches.sent() if pid == standby.pid)
            takeover = first_standby - killed_at
            count = len(dispatches.sent())
            dispatches.wait_for(
                lambda d: len(d) >= count + 3, timeout=10 * INTERVAL, what="the standby to go on"
            )
            sent = dispatches.sent()
        print(
            f"\nbeat takeover: the standby's first dispatch {takeover:.2f}s after the active "
            f"beat was killed (lock timeout {LOCK_TIMEOUT}s, loop interval "
            f"{LOCK_TIMEOUT / 5:.1f}s); {len(sent)} dispatches, one sender at a time"
        )
        # Within the lock's lapse, one loop of the standby's wait, and the interval.
        assert takeover <= LOCK_TIMEOUT + LOCK_TIMEOUT / 5 + INTERVAL + 1.0
        # One sender at a time: the killed beat until the kill, the standby after.
        senders = [pid for _, pid in sent]
        assert senders == sorted(senders, key=lambda pid: pid == standby.pid)
        # No interval's dispatch sent twice: the standby went on from the schedule's state in
        # Redis, and no two dispatches came closer than half an interval.
        gaps = [later - earlier for (earlier, _), (later, _) in zip(sent, sent[1:], strict=False)]
        assert min(gaps) >= INTERVAL / 2, f"dispatches {min(gaps):.2f}s apart"
    except BaseException:
        for path in sorted(tmp_path.glob("beat*.log")):
            print(f"== {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        for beat in beats:
            if beat.poll() is None:
                beat.terminate()
        for beat in beats:
            try:
                beat.wait(timeout=20)
            except subprocess.TimeoutExpired:
                beat.kill()
                beat.wait(timeout=10)
