import pytest
import torch

from canet_kernels.routing import merge_layers, plan_routes
from helpers import one_thread  # noqa: F401  (autouse fixture)


def test_plan_sorts_by_depth_then_width_and_inverts():
    lengths = torch.tensor([3, 0, 5, 2, 4])
    widths = torch.tensor([64, 128, 96, 64, 128])
    depths = torch.tensor([2, 8, 4, 2, 4])
    p = plan_routes(lengths, widths, depths)
    assert p.depths.tolist() == [8, 4, 4, 2, 2]
    assert p.widths.tolist() == [128, 128, 96, 64, 64]
    assert torch.equal(p.order[p.inverse], torch.arange(5))
    assert p.cu_seqlens.tolist() == [0, 0, 4, 9, 12, 14]
    # samples with depth > l form a prefix
    assert p.active_samples == [5, 5, 3, 3, 1, 1, 1, 1]
    assert p.active_tokens == [14, 14, 9, 9, 0, 0, 0, 0]


def test_layer_views_do_not_copy():
    p = plan_routes(torch.tensor([3, 2, 4]), torch.tensor([8, 8, 16]), torch.tensor([1, 2, 2]))
    x = torch.randn(9, 16)
    xv, cu, w = p.layer(1, x)
    assert xv.data_ptr() == x.data_ptr() and xv.shape[0] == p.active_tokens[1]
    assert cu.tolist() == [0, 4, 6] and w.tolist() == [16, 8]


def test_merge_layers_restores_packed_order():
    p = plan_routes(torch.tensor([1, 2, 3]), torch.tensor([8, 8, 8]), torch.tensor([1, 2, 3]))
    x = torch.arange(6.0)[:, None]
    finished, h = [], x
    for l in range(3):
        t = p.active_tokens[l]
        if t < h.shape[0]:
            finished.append(h[t:])
        h = h[:t] + 100  # "a layer"
    out = merge_layers(h, finished)
    # rows of the depth-3 sample got 3 layers, depth-2: 2, depth-1: 1
    assert out[:, 0].tolist() == [300, 301, 302, 203, 204, 105]


def test_empty_batch_and_bad_shapes():
    p = plan_routes(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long), num_layers=2)
    assert p.active_samples == [0, 0] and p.cu_seqlens.tolist() == [0]
    with pytest.raises(ValueError, match="widths must have shape"):
        plan_routes(torch.tensor([1, 2]), torch.tensor([8]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="depths must be >= 0"):
        plan_routes(torch.tensor([1]), torch.tensor([8]), torch.tensor([-1]))


def test_equal_routes_are_sorted_by_length():
    lengths = torch.tensor([3, 9, 3, 9, 5])
    p = plan_routes(lengths, torch.full((5,), 64), torch.full((5,), 2))
    assert p.lengths.tolist() == [9, 9, 5, 3, 3]


def test_run_layers_walks_the_depth_prefix():
    from canet_kernels.routing import run_layers
    p = plan_routes(torch.tensor([1, 2, 3]), torch.tensor([8, 8, 8]), torch.tensor([1, 2, 3]))
    seen = []

    def layer(k, h, cu, w):
        seen.append((k, h.shape[0], len(w)))
        return h + 100

    out = run_layers(p, torch.arange(6.0)[:, None], ["a", "b", "c"], layer)
    assert out[:, 0].tolist() == [300, 301, 302, 203, 204, 105]
    assert seen == [("a", 6, 3), ("b", 5, 2), ("c", 3, 1)]
