"""Slow end-to-end tests are skipped unless --runslow (CI always passes it)."""
from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen2_moe_dir(tmp_path_factory: pytest.TempPathFactory):
    """One tiny Qwen2-MoE checkpoint (it has a shared-expert gate) for the end-to-end tests that only read it."""
    from tiny_models import make_tiny_model
    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe") / "hf")


@pytest.fixture(scope="session", autouse=True)
def stats_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Conversions in tests cache their statistics in a session folder, never in the user's cache."""
    from gemq_gguf.gemq import cache
    root = tmp_path_factory.mktemp("stats-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "default_cache_dir", lambda: root)
        yield root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls run fastest on one torch thread (and leave the cores to ggml's quantizer threads)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CostPassSpy:
    """Stands in for the cost pass's per-layer step: records the layers it computes (`layers`) and, with
    `kill_after = k`, raises `Killed` when asked for a layer after k computed ones (a kill mid-pass)."""

    class Killed(Exception):
        pass

    def __init__(self, real) -> None:
        self.real, self.layers, self.kill_after = real, [], None

    def __call__(self, jobs, *args, **kwargs):
        if self.kill_after is not None and len(self.layers) >= self.kill_after:
            raise self.Killed
        self.layers.append(jobs.layer)
        return self.real(jobs, *args, **kwargs)


@pytest.fixture
def cost_pass(monkeypatch: pytest.MonkeyPatch) -> CostPassSpy:
    from gemq_gguf.gemq import costs
    spy = CostPassSpy(costs._layer_costs)
    monkeypatch.setattr(costs, "_layer_costs", spy)
    return spy
