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


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread on a busy machine (two threads spin waiting for each other);
    test modules of tiny models use it for every test, and it restores whatever was set."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def memorised(tmp_path_factory):
    """The memorised demo model, tokenizer and synthetic data set, trained once per test session."""
    from grin_peft.tiny import load_or_train_memorised_model

    return load_or_train_memorised_model(cache_dir=tmp_path_factory.getbasetemp() / "grin_tiny_cache", progress=False)
