"""``certman api webhooks add|list|remove``, through the click group itself."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select

from pipeline.cli.webhooks import webhooks
from pipeline.crypto.keys import Keyring, load_or_create_pipeline_key
from pipeline.models import WebhookSubscription
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.webhooks import signing
from tests.webhooks.conftest import Store


def _run(store: Store, tmp_path: Path, *args: str) -> tuple[int, str]:
    runtime = Runtime(Settings(data_dir=tmp_path, edge_public_key=None), sessions=store)
    result = CliRunner().invoke(webhooks, list(args), obj=runtime, prog_name="webhooks")
    return result.exit_code, result.output


def test_add_shows_the_secret_once_and_stores_it_only_sealed(store: Store, tmp_path: Path) -> None:
    url = "https://platform.example.com/certman/s3cr3tpath"
    code, out = _run(store, tmp_path, "add", url, "--events", "site.failed, site.active", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["events"] == ["site.active", "site.failed"]  # checked and put in order
    assert shown["url"] == "https://platform.example.com/…"
    secret = shown["secret"]
    assert len(signing.check_secret(secret)) == 32
    with store() as session:
        row = session.scalars(select(WebhookSubscription)).one()
        stored = json.dumps([row.url_shown, row.sealed, row.events, row.last_error])
    assert secret not in stored and secret.removeprefix("whsec_") not in stored
    assert "s3cr3tpath" not in stored
    key = load_or_create_pipeline_key(tmp_path / "pipeline.key")
    assert signing.open_sealed(row.sealed, Keyring.of([key]), row.id).secret == secret
    # Listing never shows it again.
    code, out = _run(store, tmp_path, "list", "--json")
    assert code == 0 and secret not in out and "s3cr3tpath" not in out
    [listed] = json.loads(out)
    assert (listed["id"], listed["pending"], listed["last_status_code"]) == (row.id, 0, None)
    code, out = _run(store, tmp_path, "list")
    assert f"{row.id}  https://platform.example.com/…  site.active,site.failed" in out
    assert "never tried" in out


def test_bad_input_is_one_line_naming_the_problem(store: Store, tmp_path: Path) -> None:
    code, out = _run(store, tmp_path, "add", "https://p.example.com/h", "--events", "site.gone")
    assert code == 1 and "unknown event type 'site.gone'" in out
    code, out = _run(store, tmp_path, "add", "http://169.254.169.254/x", "--events", "site.active")
    assert code == 1 and "cloud metadata service" in out and "Traceback" not in out
    code, out = _run(store, tmp_path, "remove", "42")
    assert code == 1 and "no webhook subscription 42" in out
    code, out = _run(store, tmp_path, "list")
    assert (code, out.strip()) == (0, "no webhook subscriptions")


def test_remove(store: Store, tmp_path: Path) -> None:
    code, out = _run(store, tmp_path, "add", "https://p.example.com/h", "--events",
                     "site.removed", "--json")  # fmt: skip
    subscription_id = json.loads(out)["id"]
    code, out = _run(store, tmp_path, "remove", str(subscription_id))
    assert code == 0 and f"removed webhook {subscription_id} (https://p.example.com/…)" in out
    assert json.loads(_run(store, tmp_path, "list", "--json")[1]) == []
