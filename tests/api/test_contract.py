"""The contract: pipeline/api/openapi.json is valid OpenAPI 3.1 (openapi-spec-validator, the
maintained validator), and the running API keeps it under requests generated from it
(schemathesis, property-based): no 5xx, every response as its schema says, requests that break
the schema refused, and every refusal a problem document. Bounded: a fixed number of examples,
derandomized."""

from __future__ import annotations

import json

from tests.api.conftest import RunningApi


def test_the_document_is_valid_openapi_3_1() -> None:
    from openapi_spec_validator import OpenAPIV31SpecValidator

    from pipeline.api.app import openapi_document

    document = json.loads(openapi_document())
    assert document["openapi"].startswith("3.1")
    errors = [str(e) for e in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def test_every_problem_type_is_documented() -> None:
    from pathlib import Path

    from pipeline.api.problems import KINDS

    guide = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    missing = [kind.type for kind in KINDS if kind.type not in guide]
    assert missing == []


def test_the_running_api_keeps_its_contract(api: RunningApi) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import positive_data_acceptance

    from pipeline.api.app import openapi_document

    token = api.token("sites:read", "sites:write", "sites:operate", name="fuzz")
    # A site to find, so that reads, renewals and revocations get past "not found" too.
    api.call("PUT", "/v1/sites/dealer.example.com", token, json={})
    schema = schemathesis.openapi.from_dict(json.loads(openapi_document()))
    operations = [result.ok() for result in schema.get_all_operations()]
    strategy = st.one_of(
        [
            operation.as_strategy(mode)
            for operation in operations
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )
    seen: dict[int, int] = {}

    @settings(
        max_examples=400,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        # The token, unless the case breaks its headers on purpose: a negative case that drops
        # or garbles Authorization must reach the API so (our token put back, it would be a
        # valid request that schemathesis expects refused).
        components = case.meta.components.items() if case.meta else ()
        breaks_headers = any(
            getattr(where, "value", where) == "header" and info.mode == GenerationMode.NEGATIVE
            for where, info in components
        )
        response = case.call_and_validate(
            base_url=api.url,
            headers={} if breaks_headers else {"Authorization": f"Bearer {token}"},
            # A name the schema allows may still be one no CA would certify (a public suffix,
            # an IP address): the API's 400 bad-name is its answer, not a contract breach.
            excluded_checks=[positive_data_acceptance],
        )
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            headers = {name.lower(): value for name, value in response.headers.items()}
            assert headers["content-type"] == ["application/problem+json"], response.text
            assert json.loads(response.text)["status"] == response.status_code

    check()
    # Both sides were exercised: answers and refusals.
    assert any(code < 300 for code in seen) and any(400 <= code < 500 for code in seen), seen
