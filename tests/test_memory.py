"""The per-rank memory accounting (dico_scale/memory.py): the ZeRO paper's partitioning by ZeRO stage."""
import pytest

from dico_scale.memory import OPTIMIZER_BYTES, account, report

N, T, W = 1001, 600, 4  # parameters, trainable ones, ranks


@pytest.mark.parametrize("zero_stage, params, grads, opt", [
    (0, N, T, T), (1, N, T, -(-T // W)), (2, N, -(-T // W), -(-T // W)), (3, -(-N // W), -(-T // W), -(-T // W))])
def test_each_zero_stage_partitions_what_the_zero_paper_says(zero_stage, params, grads, opt):
    m = account("captioner", N, T, zero_stage, W, dtype_bytes=2)
    assert (m.params, m.grads, m.optimizer) == (params * 2, grads * 2, opt * OPTIMIZER_BYTES)
    assert m.total == m.params + m.grads + m.optimizer == m.device_bytes


def test_frozen_models_have_no_gradients_or_optimizer_and_offload_leaves_the_device():
    m = account("reference", N, 0, 3, W, dtype_bytes=4, params_offloaded=True)
    assert (m.grads, m.optimizer, m.device_bytes) == (0, 0, 0) and m.params == -(-N // W) * 4
    params = m.as_params()
    assert params["memory/reference/params"] == str(m.params) and params["memory/reference/params_offloaded"] == "True"
    lines = report([m, account("captioner", N, T, 2, W, 2, optimizer_offloaded=True)])
    assert "reference (ZeRO stage 3, parameters offloaded to CPU)" in lines[0]
    assert "optimizer offloaded to CPU" in lines[1] and lines[-1].startswith("memory per rank, all models")


def test_a_zero3_rank_counts_what_it_really_holds():
    """Shards plus the small parameters ZeRO-3 keeps whole on every rank, when the engine says so."""
    m = account("evaluator", N, 0, 3, W, dtype_bytes=2, local_params=400)
    assert m.params == 800
    assert account("evaluator", N, 0, 2, W, dtype_bytes=2, local_params=400).params == N * 2  # only for ZeRO stage 3
