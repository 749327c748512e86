"""Test session set-up: a Hub-compatible server on 127.0.0.1 must be running before huggingface_hub is imported."""

# keep this block above every import that may pull in huggingface_hub (grin_peft, peft, transformers)
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hub_server  # noqa: E402  (stdlib only: safe to import first)

HUB = hub_server.start_session_hub()  # starts the server, sets HF_ENDPOINT/HF_HOME/HF_TOKEN/...

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def hub() -> hub_server.HubServer:
    return HUB
