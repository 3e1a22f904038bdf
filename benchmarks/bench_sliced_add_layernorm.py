"""Microbenchmark of sliced_add_layernorm: canet's CPU op vs plain-PyTorch providers."""
import pytest

from benchmarks._micro import MICRO_PROVIDERS, run

OP = "sliced_add_layernorm"
# short runs: pytest-benchmark's default (1 s per case) takes minutes for the four files
pytestmark = pytest.mark.benchmark(max_time=0.25, min_rounds=5)


@pytest.mark.parametrize("mode", ["fwd", "train"])
@pytest.mark.parametrize("provider", MICRO_PROVIDERS)
def test_sliced_add_layernorm(benchmark, provider, mode):
    run(benchmark, OP, provider, mode)
