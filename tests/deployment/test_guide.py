"""docs/production.md and deploy/ agree with each other, and the guide hides no unrun command.

Fast checks; test_deployment.py runs what they describe.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.distribution.acl import setuser_commands
from tests.deployment.units import (
    GUIDE,
    REPO,
    UNITS,
    blocks,
    command,
    commands,
    read_env_file,
    read_unit,
    units,
)


def test_every_command_of_the_guide_is_run_or_says_why_not() -> None:
    shell = [block for block in blocks(GUIDE.read_text()) if block.language == "sh"]
    assert len(shell) >= 6
    for block in shell:
        for text, reason in commands(block):
            assert reason is None or len(reason) > 10, f"line {block.start}: {text!r}: no reason"
    # Shell commands outside an sh block would be neither run nor marked.
    for block in blocks(GUIDE.read_text()):
        if block.language in ("", "sql") or block.language == "sh":
            continue
        raise AssertionError(f"a {block.language!r} block at line {block.start}: use sh or sql")


def test_the_not_run_marker_is_recognised() -> None:
    (block,) = blocks("```sh\nrun me\nskip me   # not run: the reason it is skipped\n```\n")
    assert commands(block) == [("run me", None), ("skip me", "the reason it is skipped")]


def test_the_guide_prints_exactly_the_generated_acl() -> None:
    (acl,) = [b for b in blocks(GUIDE.read_text()) if b.lines and "ACL SETUSER" in b.lines[0]]
    assert acl.lines == [" ".join(line) for line in setuser_commands()]


def test_the_acl_lets_gossip_subscribe() -> None:
    # kombu PSUBSCRIBEs /<db>.celeryev/worker.* for gossip: Redis wants that exact pattern.
    pipeline = setuser_commands()[1]
    assert "&/0.celeryev/worker.*" in pipeline and "&/0.celeryev/*" in pipeline


def test_the_edge_has_its_own_environment_without_the_database() -> None:
    edge = read_unit(UNITS / "certman-edge.service")
    assert edge.service["EnvironmentFile"] == ["/etc/certman/edge.env"]
    example = read_env_file(UNITS / "edge.env.example")
    assert "CERTMAN_DATABASE_URL" not in example and "CERTMAN_SIGNING_KEY" not in example
    # Required by the edge: set, not commented out.
    assert example["CERTMAN_EDGE_TRUSTED_SIGNERS"] == "/etc/certman/trusted-signers"
    assert example["CERTMAN_EDGE_KEY_DIR"] == "/etc/certman/edge-keys"
    pipeline = read_env_file(UNITS / "certman.env.example")
    assert "CERTMAN_DATABASE_URL" in pipeline
    for name, unit in units().items():
        wanted = "edge.env" if name == "certman-edge" else "certman.env"
        assert unit.service["EnvironmentFile"] == [f"/etc/certman/{wanted}"], name


def test_the_guide_creates_the_directories_it_installs_into() -> None:
    text = GUIDE.read_text()
    for directory in ("/etc/certman", "/etc/certman/edge-keys", "/etc/certman/trusted-signers"):
        assert f" {directory}\n" in text or f" {directory} " in text
    assert "install -d -m 0755 -o root -g root /etc/certman\n" in text
    assert "install -d -m 0750 -o root -g certman-edge /etc/certman/edge-keys" in text


def test_a_unit_becomes_the_command_systemd_would_run(tmp_path: Path) -> None:
    (tmp_path / "etc" / "certman").mkdir(parents=True)
    (tmp_path / "etc" / "certman" / "edge.env").write_text(
        "# comment\nCERTMAN_REDIS_URL='rediss://u:p$w;x@redis.internal/0'\n"
    )
    argv = command(read_unit(UNITS / "certman-edge.service"), root=tmp_path)
    assert argv[:2] == ["prlimit", "--core=0"] and argv[2].startswith("--nofile=")
    assert argv[4:7] == ["setpriv", "--reuid=certman-edge", "--regid=certman-edge"]
    assert "--ambient-caps=+net_bind_service" in argv and "--no-new-privs" in argv
    assert "CERTMAN_REDIS_URL=rediss://u:p$w;x@redis.internal/0" in argv
    assert argv[argv.index("env") + 2 : argv.index("env") + 5] == [
        "sh", "-c", 'umask 0077 && exec "$@"'
    ]  # fmt: skip
    assert "/opt/certman/bin/certman-edge" in argv
    (tmp_path / "etc" / "certman" / "certman.env").write_text("CERTMAN_DATA_DIR=/var/lib/certman\n")
    worker = command(read_unit(UNITS / "certman-worker.service"), root=tmp_path)
    assert "PROMETHEUS_MULTIPROC_DIR=/run/certman-worker" in worker
    # Gossip, mingle and heartbeats stay on: the ACL grants what they subscribe to.
    assert not any(arg.startswith("--without-") for arg in worker) and "-E" in worker


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv switches users as root only")
def test_certman_run_reads_the_file_as_systemd_does(tmp_path: Path) -> None:
    env_file = tmp_path / "certman.env"
    env_file.write_text('# x\n\nCERTMAN_A=one;two$three\nCERTMAN_B="quoted value"\n')
    result = subprocess.run(
        [str(REPO / "deploy" / "systemd" / "certman-run"), "/usr/bin/env"],
        env={"CERTMAN_ENV_FILE": str(env_file), "CERTMAN_RUN_USER": "root",
             "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "CERTMAN_A=one;two$three" in lines and "CERTMAN_B=quoted value" in lines


def test_certman_run_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO / "deploy" / "systemd" / "certman-run"), "certman", "--version"],
        env={"CERTMAN_ENV_FILE": str(tmp_path / "missing.env"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing.env" in result.stderr
