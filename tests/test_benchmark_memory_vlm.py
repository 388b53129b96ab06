"""benchmarks/vlm_memory.py: the activation formula holds on a tiny model, and the projections order as they must."""
import sys

import pytest

sys.path.insert(0, "benchmarks")
vlm_memory = pytest.importorskip("vlm_memory")


def test_activation_formula_matches_what_autograd_saves_on_a_tiny_qwen2_vl():
    for row in vlm_memory.validate(families=("qwen2-vl",)):
        assert 0.97 <= row["measured_over_formula"] <= 1.12, row


def test_projections_of_a_7b_captioner():
    spec = vlm_memory.MODELS["Qwen2-VL-7B-like"]
    c = vlm_memory.counts(spec)
    assert 8.0e9 < c["total"] < 8.6e9 and 0.6e9 < c["vision"] < 0.7e9 and 9e6 < c["lora"] < 11e6

    def peak(**kw):
        return vlm_memory.project("q", spec, c, **kw)

    full = peak(lora=False, separate_reference=True, zero=2, world=8)
    lora = peak(lora=True, separate_reference=True, zero=2, world=8)
    off = peak(lora=True, separate_reference=False, zero=2, world=8)
    z3 = peak(lora=False, separate_reference=True, zero=3, world=8)
    z3_64 = peak(lora=False, separate_reference=True, zero=3, world=64)
    assert off["reference"] == 0 < lora["reference"] == full["reference"]
    assert lora["captioner_states"] < full["captioner_states"] and off["peak"] < lora["peak"] < full["peak"]
    assert z3_64["captioner_states"] < z3["captioner_states"] < full["captioner_states"]
    assert z3["generation"] > full["generation"]  # ZeRO-3 gathers the whole captioner for beam search
    # the tightest setting fits 80 GB since the chunked head stopped upcasting the whole head (BENCHMARKS.md)
    assert full["fits"]["80 GB"] and full["peak"] > 70 * vlm_memory.GIB
    recomputed = peak(lora=False, separate_reference=True, zero=3, world=8, checkpointing=True)
    assert recomputed["training"] < z3["training"] / 3 and recomputed["captioner_states"] == z3["captioner_states"]
