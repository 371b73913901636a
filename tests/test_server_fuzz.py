"""HTTP fuzzing with schemathesis against the server's own ``/openapi.json`` (bounded): whatever
the generated requests hold, no answer is a 5xx and every error has OpenAI's shape."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from helpers_server import make_model, serve_in_thread, wait_until_idle

# NOTE: a few examples per operation, a short context: the whole run stays within seconds on a CPU.
MAX_EXAMPLES = 8


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model_dir = make_model(tmp_path_factory.mktemp("server_fuzz"))
    with serve_in_thread(model_dir, max_model_len=24, max_num_seqs=8, max_num_batched_tokens=256) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_no_request_gets_a_server_error(api_schema):
    # NOTE: hypothesis directly over each operation's strategy (schemathesis' pytest plugin does not
    # load under this pytest); the same generated cases, the same check.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    for operation in operations:
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if response.status_code >= 400 and case.path != "/metrics":
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text[:500]

        check()


def test_the_schema_describes_the_request_models(api_schema, fuzz_server):
    raw = api_schema.raw_schema
    components = raw["components"]["schemas"]
    for model, fields in (("CompletionRequest", ("prompt", "max_tokens", "logprobs", "echo", "min_tokens",
                                                 "repetition_penalty", "logit_bias", "stop")),
                          ("ChatCompletionRequest", ("messages", "top_logprobs", "min_p", "seed"))):
        assert set(fields) <= set(components[model]["properties"]), model
    assert components["CompletionRequest"]["properties"]["n"]["maximum"] == 128
    # After the fuzzing, the engine holds nothing for requests.
    metrics = wait_until_idle(fuzz_server.url, 60)
    assert metrics["deltaserve_state_slots_used"] == 0 and metrics["deltaserve_kv_blocks_used"] == 0
