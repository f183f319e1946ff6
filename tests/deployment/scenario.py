"""docs/production.md followed to the letter on a "fresh host": run by test_deployment.py.

``python -m tests.deployment.scenario CONFIG.json``, started inside a network namespace and a
mount namespace of its own (so the units' fixed ports, /etc, /opt/certman and /var/lib are its
own and the machine's stay untouched). It:

* gives the namespace private copies of /etc and empty /opt/certman, /var/lib, /run and
  /usr/local/sbin; names ``redis.internal`` and ``db.internal`` in its /etc/hosts;
* starts PostgreSQL (its own ``initdb``) and runs the guide's SQL; a TLS Redis with an
  ``aclfile`` and runs the guide's ``ACL SETUSER`` lines; Pebble, whose DNS answers every name
  with 127.0.0.1, validating on port 80;
* runs every command of the guide's ``sh`` blocks, in order, as root in a copy of the checkout
  (pip installs from a wheelhouse: the namespace has no route out), except those marked
  ``# not run:``; at ``systemctl enable --now UNIT...`` it starts each unit as systemd would
  (:func:`tests.deployment.units.command`) and restarts one that exits (``Restart=always``);
* edits the environment files as an operator would (passwords, and the staging section's
  test CA settings);
* then checks: a certificate issued and served by the edge; the edge's, worker's, exporter's
  and Flower's endpoints; who can read what; Redis restarted empty under the running roles
  (every role back, the snapshot republished, a site added afterwards issued); no traceback in
  any role's log. Writes what it saw to the result file; exits 1 on the first failed check.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.deployment.units import GUIDE, GUIDE_PATH, Unit, blocks, command, commands, read_unit
from tests.support.pebble import Pebble
from tests.support.ports import port_open, wait_until
from tests.support.redis_tls_server import make_ca

SITE = "test.example.com"  # the guide's own example
LATER_SITE = "after-restart.example.com"


def run(cmd: list[str] | str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=kwargs.pop("timeout", 300), **kwargs
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{cmd!r} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


class Scenario:
    def __init__(self, config: dict[str, Any]) -> None:
        self.work = Path(config["work"])
        self.checkout = Path(config["checkout"])
        self.wheelhouse = Path(config["wheelhouse"])
        self.result_path = Path(config["result"])
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.result: dict[str, Any] = {"steps": [], "restarts": {}, "not_run": []}
        self.started = time.monotonic()
        self.units: dict[str, Unit] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.passwords = {
            name: secrets.token_urlsafe(18)
            for name in ("db", "redis-admin", "edge", "pipeline", "flower")
        }
        self.others: list[subprocess.Popen[bytes]] = []
        self.pebble: Pebble | None = None
        self.redis_proc: subprocess.Popen[bytes] | None = None

    # --- helpers -------------------------------------------------------------------------
    def step(self, what: str) -> None:
        elapsed = round(time.monotonic() - self.started, 1)
        self.result["steps"].append([elapsed, what])
        print(f"[{elapsed:6.1f} s] {what}", flush=True)

    def certman_run(self, *args: str) -> str:
        return run(["/usr/local/sbin/certman-run", *args], cwd="/").stdout

    # --- the host --------------------------------------------------------------------------
    def fresh_host(self) -> None:
        fs = self.work / "fs"
        shutil.copytree("/etc", fs / "etc", symlinks=True)
        for target, source in (
            ("/etc", fs / "etc"),
            ("/opt", fs / "opt"),  # the host's /opt/certman, if any, stays out of sight
            ("/var/lib", fs / "var-lib"),
            ("/run", fs / "run"),
            ("/usr/local/sbin", fs / "sbin"),
        ):
            source.mkdir(parents=True, exist_ok=True)
            source.chmod(0o755)
            run(["mount", "--bind", str(source), target])
        with open("/etc/hosts", "a") as hosts:
            hosts.write("127.0.0.1 redis.internal db.internal\n")
        self.step("fresh host: private /etc, /opt, /var/lib, /run, /usr/local/sbin")

    def postgres(self) -> None:
        data = Path("/var/lib/pgtest")
        run(["install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700", str(data)])
        initdb = ["initdb", "-D", str(data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-sync"]  # fmt: skip
        run(["runuser", "-u", "postgres", "--", *initdb], timeout=120)
        log = (self.logs / "postgres.log").open("ab")
        self.others.append(
            subprocess.Popen(
                ["runuser", "-u", "postgres", "--", "postgres", "-D", str(data),
                 "-h", "127.0.0.1", "-p", "5432", "-k", str(data)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        wait_until(lambda: port_open(5432), timeout=30, what="PostgreSQL")
        (sql,) = [block for block in blocks(GUIDE.read_text()) if block.language == "sql"]
        for statement in " ".join(sql.lines).split(";"):
            if statement.strip():
                statement = statement.replace("'…'", f"'{self.passwords['db']}'")
                run(["runuser", "-u", "postgres", "--", "psql", "-h", str(data), "-v",
                     "ON_ERROR_STOP=1", "-c", statement.strip()])  # fmt: skip
        self.step("PostgreSQL: the guide's SQL run")

    def redis_tls(self) -> None:
        directory = self.work / "redis"
        directory.mkdir()
        ca = make_ca(directory, "redis CA")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names = [
            x509.DNSName("redis.internal"),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis.internal")]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(ca.key, hashes.SHA256())
        )
        (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = directory / "server.key"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        self.redis_ca = ca.file
        shutil.copyfile(ca.file, self.checkout / "redis-ca.pem")  # what the guide installs
        acl_file = directory / "users.acl"
        acl_file.write_text(f"user default on >{self.passwords['redis-admin']} ~* &* +@all\n")
        self.redis_command = [
            "redis-server", "--port", "0", "--tls-port", "6379", "--bind", "127.0.0.1",
            "--tls-cert-file", str(directory / "server.crt"), "--tls-key-file", str(key_file),
            "--tls-ca-cert-file", str(ca.file), "--tls-auth-clients", "no",
            "--aclfile", str(acl_file), "--save", "", "--appendonly", "no",
            "--dir", str(directory),
        ]  # fmt: skip
        self.start_redis()
        # The guide's ACL block, as an administrator runs it, then ACL SAVE (users kept in the
        # aclfile, so a restarted Redis has them).
        (acl,) = [b for b in blocks(GUIDE.read_text()) if b.lines and "ACL SETUSER" in b.lines[0]]
        admin = self.redis_admin()
        for line in acl.lines:
            line = line.replace("EDGE-PASSWORD", self.passwords["edge"])
            line = line.replace("PIPELINE-PASSWORD", self.passwords["pipeline"])
            admin.execute_command(*shlex.split(line))
        admin.execute_command("ACL", "SAVE")
        admin.close()
        self.step("TLS Redis: the guide's ACL users set and saved")

    def start_redis(self) -> None:
        log = (self.logs / "redis.log").open("ab")
        self.redis_proc = subprocess.Popen(self.redis_command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: port_open(6379), timeout=20, what="Redis")

    def redis_admin(self) -> redis.Redis[Any]:
        return redis.Redis(
            host="redis.internal", port=6379, ssl=True, ssl_ca_certs=str(self.redis_ca),
            username="default", password=self.passwords["redis-admin"], socket_timeout=5,
        )  # fmt: skip

    def ca(self) -> None:
        self.pebble = Pebble(http_port=80)
        self.pebble.start()
        self.step("Pebble (validating on port 80, every name resolving to 127.0.0.1)")

    # --- the guide ---------------------------------------------------------------------------
    def guide(self) -> None:
        # An operator's root shell: nothing of the test's virtualenv.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = GUIDE_PATH
        # No route out of the namespace: pip installs what the test downloaded beforehand.
        env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(self.wheelhouse)}
        for block in blocks(GUIDE.read_text()):
            if block.language != "sh":
                continue
            script: list[str] = []
            for text, reason in commands(block):
                if reason is None:
                    script.append(text)
                    continue
                self.result["not_run"].append([text, reason])
                if text.startswith("systemctl enable --now"):
                    self._shell(script, env, block.start)
                    script = []
                    self.start_units(text.split()[3:])
            self._shell(script, env, block.start)
        self.step("every command of the guide run (or marked not run)")

    def _shell(self, lines: list[str], env: dict[str, str], line: int) -> None:
        if not lines:
            return
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
            cwd=self.checkout, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        (self.logs / "guide.log").open("a").write(
            f"== guide line {line}\n" + "\n".join(lines) + f"\n{result.stdout}{result.stderr}\n"
        )
        if result.returncode != 0:
            raise AssertionError(
                f"the guide's block at line {line} failed ({result.returncode}):\n"
                + "\n".join(lines) + f"\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )  # fmt: skip
        self.step(f"guide block at line {line}: {len(lines)} commands")
        self.edit_env_files()

    def edit_env_files(self) -> None:
        """What the guide says to edit: passwords and host names (the examples' are already
        redis.internal and db.internal), and for the test CA what the staging section says."""
        pipeline_env = Path("/etc/certman/certman.env")
        if not pipeline_env.exists() or "CHANGE-ME" not in pipeline_env.read_text():
            return
        assert self.pebble is not None
        shutil.copyfile(self.pebble.ca_bundle, "/etc/certman/acme-ca.pem")
        os.chmod("/etc/certman/acme-ca.pem", 0o644)
        text = pipeline_env.read_text()
        pw = self.passwords
        for example, value in (
            ("certman:CHANGE-ME@db.internal", f"certman:{pw['db']}@db.internal"),
            ("certman-pipeline:CHANGE-ME@", f"certman-pipeline:{pw['pipeline']}@"),
            ("# FLOWER_BASIC_AUTH=ops:CHANGE-ME", f"FLOWER_BASIC_AUTH=ops:{pw['flower']}"),
        ):
            text = text.replace(example, value)
        lines = [
            line for line in text.splitlines() if not line.startswith("CERTMAN_ACME_DIRECTORY=")
        ]
        lines += [
            f"CERTMAN_ACME_DIRECTORY={self.pebble.directory_url}",
            "CERTMAN_ACME_CA_BUNDLE=/etc/certman/acme-ca.pem",
            f"CERTMAN_DNS_RESOLVER={self.pebble.dns_resolver}",
        ]
        pipeline_env.write_text("\n".join(lines) + "\n")
        edge_env = Path("/etc/certman/edge.env")
        edge_text = edge_env.read_text()
        edge_env.write_text(
            edge_text.replace("certman-edge:CHANGE-ME@", f"certman-edge:{pw['edge']}@")
        )
        assert "CHANGE-ME" not in pipeline_env.read_text() + edge_env.read_text()
        self.step("environment files edited (passwords; the staging section's test CA)")

    # --- systemd's part ----------------------------------------------------------------------
    def start_units(self, names: list[str]) -> None:
        for name in names:
            unit = read_unit(self.checkout / "deploy" / "systemd" / f"{name}.service")
            self.units[name] = unit
            self.result["restarts"][name] = 0
            self._spawn(unit)
        self.step(f"started as systemd would: {' '.join(names)}")

    def _spawn(self, unit: Unit) -> None:
        user, group = unit.one("User", "root"), unit.one("Group", "root")
        for key, mode_key, base in (
            ("StateDirectory", "StateDirectoryMode", "/var/lib"),
            ("RuntimeDirectory", "RuntimeDirectoryMode", "/run"),
        ):
            for name in unit.one(key).split():
                run(["install", "-d", "-o", user, "-g", group, "-m",
                     unit.one(mode_key, "0755"), f"{base}/{name}"])  # fmt: skip
        log = (self.logs / f"{unit.name}.log").open("ab")
        self.processes[unit.name] = subprocess.Popen(
            command(unit),
            cwd=unit.one("WorkingDirectory", "/"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def supervise(self) -> None:
        """Restart=always, RestartSec=: a unit whose process exits is started again."""
        while not self.stopping.wait(0.5):
            with self.lock:
                for name, process in list(self.processes.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    unit = self.units[name]
                    with (self.logs / f"{name}.log").open("a") as log:
                        log.write(f"[supervisor] {name} exited with {code}; restarting\n")
                    self.result["restarts"][name] += 1
                    time.sleep(float(unit.one("RestartSec", "1")))
                    self._spawn(unit)

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for process in self.processes.values():
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            for process in self.processes.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        if self.pebble is not None:
            self.pebble.stop()
            shutil.rmtree(self.pebble.workdir, ignore_errors=True)
        for other in [self.redis_proc, *self.others]:
            if other is not None and other.poll() is None:
                other.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown; Redis stops
                try:
                    other.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    other.kill()

    # --- checks ------------------------------------------------------------------------------
    def domains(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.certman_run("certman", "domains", "list", "--json"))
        return {row["domain"]: row for row in rows}

    def wait_served(self, name: str, timeout: float) -> dict[str, Any]:
        assert self.pebble is not None
        wait_until(lambda: self.domains().get(name, {}).get("state") == "active",
                   timeout=timeout, what=f"{name} to become active", every=1)  # fmt: skip
        root = self.pebble.root_pem()

        def served() -> str:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(cadata=root.decode())
            with (
                socket.create_connection(("127.0.0.1", 443), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=name) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number.to_bytes(20).hex()

        wait_until(lambda: bool(served()), timeout=30, what=f"the edge to serve {name}")
        return {"serial": served(), "row": self.domains()[name]}

    def http(self, url: str, auth: str | None = None) -> tuple[int, str]:
        request = urllib.request.Request(url)
        if auth:
            request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status), response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    def endpoints(self) -> None:
        flower_auth = f"ops:{self.passwords['flower']}"
        checks = {
            "edge /healthz": ("http://127.0.0.1:9443/healthz", None, ""),
            "edge /metrics": ("http://127.0.0.1:9443/metrics", None, "certman_edge_"),
            "worker /metrics": ("http://127.0.0.1:9109/metrics", None, "certman_issuance_steps"),
            "exporter /metrics": ("http://127.0.0.1:9108/metrics", None, "certman_"),
            "flower": ("http://127.0.0.1:5555/api/workers", flower_auth, ""),
            "api /healthz": ("http://127.0.0.1:8470/healthz", None, ""),
            "api /metrics": ("http://127.0.0.1:8470/metrics", None, "certman_api_"),
        }  # fmt: skip
        seen = {}
        for what, (url, auth, expect) in checks.items():

            def answers(url: str = url, auth: str | None = auth, expect: str = expect) -> bool:
                try:
                    status, body = self.http(url, auth)
                except OSError:
                    return False
                return status == 200 and expect in body

            wait_until(answers, timeout=60, what=f"{what} to answer 200", every=1)
            seen[what] = 200
        self.result["endpoints"] = seen
        self.step("edge, worker, exporter, Flower and API endpoints answer")

    def permissions(self) -> None:
        probe = (
            "import json, os, sys\n"
            "out = {}\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        (os.listdir if os.path.isdir(path) else (lambda p: open(p).read()))(path)\n"
            "        out[path] = 'read'\n"
            "    except PermissionError:\n"
            "        out[path] = 'denied'\n"
            "print(json.dumps(out))\n"
        )
        edge_keys = sorted(Path("/etc/certman/edge-keys").glob("*.key"))
        assert edge_keys, "no edge key installed"
        forbidden = {
            "certman-edge": ["/etc/certman/certman.env", "/etc/certman/signing.key",
                             "/etc/certman/pipeline.key", "/var/lib/certman"],
            "certman": [str(edge_keys[0]), "/etc/certman/edge-keys", "/etc/certman/edge.env",
                        "/var/lib/certman-edge"],
        }  # fmt: skip
        needed = {
            "certman-edge": ["/etc/certman/edge.env", str(edge_keys[0]),
                             "/etc/certman/trusted-signers", "/etc/certman/redis-ca.pem"],
            "certman": ["/etc/certman/certman.env", "/etc/certman/signing.key",
                        "/etc/certman/pipeline.key", "/etc/certman/edge.pub"],
        }  # fmt: skip
        seen: dict[str, Any] = {}
        for user in forbidden:
            paths = forbidden[user] + needed[user]
            result = subprocess.run(
                ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                 sys.executable, "-I", "-c", probe, *paths],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            outcome = json.loads(result.stdout)
            seen[user] = outcome
            for path in forbidden[user]:
                assert outcome[path] == "denied", f"{user} can read {path}"
            for path in needed[user]:
                assert outcome[path] == "read", f"{user} cannot read {path}, which it needs"
        edge_env = command(self.units["certman-edge"])
        assert not any(arg.startswith("CERTMAN_DATABASE_URL=") for arg in edge_env)
        assert not any("CERTMAN_SIGNING_KEY=" in arg for arg in edge_env)
        self.result["permissions"] = seen
        self.step("permissions: each user reads what it needs, and not the other's secrets")

    def redis_restart(self) -> None:
        admin = self.redis_admin()
        assert admin.hexists("certman:signed", SITE)
        admin.close()
        before = dict(self.result["restarts"])
        assert self.redis_proc is not None
        self.redis_proc.send_signal(signal.SIGTERM)
        self.redis_proc.wait(timeout=20)
        self.step("Redis stopped (no persistence: it comes back empty)")
        time.sleep(0)  # restart at once: the roles meet an empty Redis, as after a crash
        self.start_redis()
        admin = self.redis_admin()
        assert admin.dbsize() == 0 or not admin.hexists("certman:signed", SITE)
        self.step("Redis started again, empty, its ACL users from the aclfile")
        # Every role back: running, and (the edge) healthy.
        wait_until(lambda: all(p.poll() is None for p in self.processes.values()),
                   timeout=60, what="every role running")  # fmt: skip
        try:
            wait_until(lambda: admin.hexists("certman:signed", SITE), timeout=150,
                       what="the snapshot republished after Redis restarted", every=1)  # fmt: skip
        finally:
            self.result["restarts_during_redis_restart"] = {
                name: self.result["restarts"][name] - before.get(name, 0)
                for name in self.result["restarts"]
            }
        self.step("snapshot republished")
        self.certman_run("certman", "domains", "add", LATER_SITE)
        self.result["after_restart"] = self.wait_served(LATER_SITE, timeout=150)
        admin.close()
        self.step(f"{LATER_SITE}, added after the restart, issued and served")
        self.endpoints()

    def tracebacks(self) -> None:
        found = {}
        for name in self.units:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            if "Traceback" in text:
                index = text.index("Traceback")
                found[name] = text[max(0, index - 500) : index + 2500]
        self.result["tracebacks"] = found
        assert not found, "tracebacks in: " + ", ".join(found) + "\n" + "\n".join(found.values())

    def main(self) -> int:
        supervisor = threading.Thread(target=self.supervise, daemon=True)
        try:
            self.fresh_host()
            self.postgres()
            self.redis_tls()
            self.ca()
            supervisor.start()
            self.guide()
            self.result["issued"] = self.wait_served(SITE, timeout=180)
            self.step(f"{SITE} issued through the edge and served")
            self.endpoints()
            self.permissions()
            self.tracebacks()
            self.redis_restart()
            self.tracebacks()
            self.result["ok"] = True
            return 0
        except BaseException as exc:  # report what failed with the logs, then clean up
            self.result["ok"] = False
            self.result["error"] = "".join(traceback.format_exception(exc))[-6000:]
            print(self.result["error"], flush=True)
            for path in sorted(self.logs.glob("*.log")):
                print(f"== {path.name}\n{path.read_text(errors='replace')[-3000:]}", flush=True)
            return 1
        finally:
            self.result["seconds"] = round(time.monotonic() - self.started, 1)
            self.stop()
            self.result_path.write_text(json.dumps(self.result, indent=1))


if __name__ == "__main__":
    raise SystemExit(Scenario(json.loads(Path(sys.argv[1]).read_text())).main())
