"""Rollouts: sampling (temperature, top-k, k samples per image) against known distributions, its log-probs against
teacher forcing, and the Rollout that the dico stage (and later SCST) draws its candidates from."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dico_scale.config import CaptionerConfig, ConfigError, GenerationConfig, load_config
from dico_scale.data.tokenizer import CaptionTokenizer
from dico_scale.kernels import sequence_logprobs
from dico_scale.models.builtin import Captioner
from dico_scale.models.captioner import CaptionerModel, scored_mask
from dico_scale.models.generation import beam_search, sample
from dico_scale.rollout import Rollout

V, BOS, EOS, PAD = 8, 0, 1, 7  # the toy vocabulary: words are 2..6
TOY = SimpleNamespace(bos=BOS, eos=EOS, pad=PAD)


class Bigram(CaptionerModel):
    """A hand-made decoder with the captioner's generation API (image_context / decoder_hidden / logits, and the teacher-forced
    forward that Rollout.sequence_logprobs calls): the next-token logits are table[last token] + a per-image bias, so
    every step's distribution is known in closed form. decoder_hidden ignores the KV cache it is given: its output at a
    position depends on that position's token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def image_context(self, visual_tokens):  # "visual tokens" [B, 1, V] are the per-image bias
        return visual_tokens

    def decoder_hidden(self, tokens, memory, cache=None):
        return self.table[tokens] + memory

    def logits(self, hidden):
        return hidden

    def forward(self, tokens, visual_tokens=None, repeats=1, output="logits", kernel="auto", fused=False):
        logits = self.decoder_hidden(tokens[:, :-1], self.image_context(visual_tokens).repeat_interleave(repeats, dim=0))
        if output == "logits":
            return logits
        assert output == "logprobs" and not fused
        return sequence_logprobs(logits, tokens[:, 1:], tokens[:, 1:] != PAD, kernel=kernel)


def toy(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return Bigram(scale * torch.randn(V, V, generator=g)), torch.randn(2, 1, V, generator=g)


def allowed(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the whole vocabulary with BOS and PAD excluded, as both searches do."""
    logp = torch.log_softmax(logits.double(), -1)
    logp[..., [BOS, PAD]] = float("-inf")
    return logp


def check_layout(tokens: torch.Tensor, max_len: int):
    """BOS first, no BOS or PAD before EOS, only PAD after it, at most max_len tokens after BOS."""
    assert 2 <= tokens.size(-1) <= max_len + 1 and (tokens[..., 0] == BOS).all()
    for row in tokens.reshape(-1, tokens.size(-1)).tolist():
        body = row[1:]
        end = body.index(EOS) if EOS in body else len(body)
        assert BOS not in body[:end] and PAD not in body[:end], row
        assert all(t == PAD for t in body[end + 1:]), row


@torch.no_grad()
def closed_form_logprobs(m: Bigram, bias: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, k] float64 sums of the untempered log-softmax of every token up to and including EOS."""
    B, k, L = tokens.shape
    out = torch.zeros(B, k, dtype=torch.float64)
    for b in range(B):
        for j in range(k):
            row = tokens[b, j].tolist()
            for t in range(1, L):
                if row[t - 1] in (EOS, PAD):
                    break
                out[b, j] += torch.log_softmax((m.table[row[t - 1]] + bias[b, 0]).double(), -1)[row[t]]
    return out


# ---- sample: distributions ---------------------------------------------------------------------------------------

N = 30000  # draws per check; 5 standard errors sqrt(p(1-p)/N) <= 0.0145, a false failure has odds below 1e-5


def first_token_frequencies(m, bias, **kw) -> torch.Tensor:
    tokens, _ = sample(m, bias[:1], N, 1, BOS, EOS, PAD, generator=torch.Generator().manual_seed(1), **kw)
    return torch.bincount(tokens[0, :, 1], minlength=V).double() / N


def within_5_sigma(freq, p) -> bool:
    return bool(((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-9).all())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_first_token_frequencies_follow_the_tempered_softmax(temperature):
    m, bias = toy(scale=2.0)
    with torch.no_grad():
        logits = m.table[BOS] + bias[0, 0]
    freq = first_token_frequencies(m, bias, temperature=temperature)
    p = torch.softmax(allowed(logits) / temperature, -1)
    assert within_5_sigma(freq, p), (freq, p)
    assert freq[BOS] == 0 and freq[PAD] == 0
    if temperature != 1.0:  # the tolerance is tight enough to tell the untempered distribution apart
        assert not within_5_sigma(freq, torch.softmax(allowed(logits), -1))


def test_top_k_restricts_the_support_to_the_k_most_likely_tokens():
    m, bias = toy(seed=2, scale=2.0)
    with torch.no_grad():
        m.table[:, BOS] = m.table[:, PAD] = 20.0  # the most likely of all, and never drawn: top-k is over the rest
        logits = m.table[BOS] + bias[0, 0]
    logp = allowed(logits)
    top3 = set(logp.topk(3).indices.tolist())
    freq = first_token_frequencies(m, bias, top_k=3, temperature=1.5)
    assert set(freq.nonzero().squeeze(1).tolist()) == top3
    p = torch.zeros(V, dtype=torch.float64)
    idx = torch.tensor(sorted(top3))
    p[idx] = torch.softmax(logp[idx] / 1.5, -1)
    assert within_5_sigma(freq, p), (freq, p)
    # every later step too: each token is among the 3 most likely after the token before it
    tokens, _ = sample(m, bias, 200, 5, BOS, EOS, PAD, top_k=3, generator=torch.Generator().manual_seed(2))
    for b in range(2):
        with torch.no_grad():
            best = allowed(m.table + bias[b, 0]).topk(3, dim=-1).indices  # [prev, 3]
        for row in tokens[b].tolist():
            for prev, new in zip(row, row[1:]):
                if prev in (EOS, PAD):
                    break
                assert new in best[prev].tolist()
    greedy, _ = sample(m, bias, 4, 5, BOS, EOS, PAD, top_k=1)
    assert (greedy == greedy[:, :1]).all()  # top_k=1 is greedy: the k samples of an image agree


# ---- sample: log-probs, layout, reproducibility --------------------------------------------------------------------

def test_sampled_logprobs_are_the_untempered_policy_s():
    m, bias = toy(seed=3)
    with torch.no_grad():
        m.table[:, EOS] += 1.0  # rows finish at different lengths, then PAD
    tokens, scores = sample(m, bias, 50, 6, BOS, EOS, PAD, temperature=0.5, top_k=3,
                            generator=torch.Generator().manual_seed(3))
    assert (tokens == EOS).any() and (tokens == PAD).any()
    torch.testing.assert_close(scores.double(), closed_form_logprobs(m, bias, tokens), rtol=0, atol=1e-5)
    rollout = Rollout(GenerationConfig(candidates=50, max_len=6, strategy="sample"), TOY, kernel="torch")
    with torch.no_grad():
        tf = rollout.sequence_logprobs(m, tokens.flatten(0, 1), bias)
    torch.testing.assert_close(tf.view(2, 50), scores, rtol=0, atol=1e-5)


def test_layout_bos_and_pad_never_sampled_pad_after_eos_max_len():
    m, bias = toy(seed=4)
    with torch.no_grad():
        m.table[:, BOS] = m.table[:, PAD] = 30.0  # by far the most likely: only the masking keeps them out
        m.table[:, EOS] += 2.0
    tokens, scores = sample(m, bias, 100, 5, BOS, EOS, PAD, generator=torch.Generator().manual_seed(4))
    check_layout(tokens, 5)
    assert tokens.shape == (2, 100, 6) and (tokens == EOS).any() and (tokens == PAD).any()
    assert torch.isfinite(scores).all() and (scores < 0).all()
    with torch.no_grad():
        m.table[:, EOS] = -1e4
    assert sample(m, bias, 3, 4, BOS, EOS, PAD)[0].shape == (2, 3, 5)  # nothing ends: max_len tokens
    with torch.no_grad():
        m.table[:, EOS] = 1e4
    tokens, scores = sample(m, bias, 3, 4, BOS, EOS, PAD)  # everything ends at once: generation stops there
    assert tokens.shape == (2, 3, 2) and (tokens[..., 1] == EOS).all() and scores.abs().max() < 1e-5


def test_same_generator_seed_same_samples():
    m, bias = toy(seed=5)
    draw = lambda seed: sample(m, bias, 8, 6, BOS, EOS, PAD, temperature=1.3,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    (a, sa), (b, sb), (c, _) = draw(7), draw(7), draw(8)
    assert torch.equal(a, b) and torch.equal(sa, sb) and not torch.equal(a, c)


# ---- a real (tiny, random) captioner -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


@pytest.fixture(scope="module")
def captioner(tok):
    """(captioner with dropout 0.1 in train mode, visual tokens of 2 images)."""
    torch.manual_seed(0)
    m = Captioner(CaptionerConfig(image_encoder="dico-tiny", width=64, heads=4, encoder_layers=1, decoder_layers=1,
                                  dropout=0.1), tok).train()
    with torch.no_grad():
        vt = m.visual_tokens(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    return m, vt


def sample_without_cache(m, memory, k, max_len, tok, temperature, top_k, generator):
    """sample's steps with a full forward over the whole prefix each step instead of the KV cache."""
    memory = memory.repeat_interleave(k, dim=0)
    seq = torch.full((memory.size(0), 1), tok.bos)
    total = torch.zeros(memory.size(0))
    done = torch.zeros(memory.size(0), dtype=torch.bool)
    for _ in range(max_len):
        logp = torch.log_softmax(m.logits(m.decoder_hidden(seq, memory))[:, -1].float(), -1)
        logp[:, [tok.bos, tok.pad]] = float("-inf")
        vals, ids = logp.topk(top_k, dim=-1)
        nxt = ids.gather(-1, torch.multinomial(torch.softmax(vals / temperature, -1), 1, generator=generator))[:, 0]
        total += torch.where(done, 0.0, logp.gather(-1, nxt[:, None])[:, 0])
        seq = torch.cat([seq, nxt.masked_fill(done, tok.pad)[:, None]], 1)
        done |= nxt == tok.eos
        if done.all():
            break
    return seq.view(-1, k, seq.size(1)), total.view(-1, k)


def test_real_captioner_kv_cache_sampling_equals_full_forward_and_teacher_forcing(captioner, tok):
    m, vt = captioner
    m.eval()
    try:
        with torch.no_grad():
            memory = m.image_context(vt)
            tokens, scores = sample(m, memory, 5, 6, tok.bos, tok.eos, tok.pad, temperature=0.7, top_k=50,
                                    generator=torch.Generator().manual_seed(0))
            ref_tokens, ref_scores = sample_without_cache(m, memory, 5, 6, tok, 0.7, 50,
                                                          torch.Generator().manual_seed(0))
            rollout = Rollout(GenerationConfig(candidates=5, max_len=6, strategy="sample"), tok, kernel="torch")
            tf = rollout.sequence_logprobs(m, tokens.flatten(0, 1), vt).view(2, 5)
    finally:
        m.train()
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # float32 sums near -60 (log 49409 ~ 10.8 a token): 1e-5 relative is a few float32 ulps
    torch.testing.assert_close(tf, scores, rtol=1e-5, atol=1e-5)


def test_rollout_beam_is_exactly_beam_search_and_restores_train_mode(captioner, tok):
    m, vt = captioner
    rollout = Rollout(GenerationConfig(candidates=3, max_len=5, length_penalty=0.5), tok)
    got = rollout.candidates(m, vt)
    assert m.training and not m.image_encoder.training  # restored; the frozen tower stays in eval mode
    m.eval()
    with torch.no_grad():
        want, _ = beam_search(m, m.image_context(vt), 3, 5, tok.bos, tok.eos, tok.pad, 0.5)
    assert torch.equal(got, want.flatten(0, 1))
    assert torch.equal(rollout.candidates(m, vt), got) and not m.training  # eval mode is restored as eval
    m.train()
    labels, mask = rollout.labels(got), rollout.mask(got)
    assert torch.equal(labels, got[:, 1:]) and torch.equal(mask, got[:, 1:] != tok.pad)


def test_rollout_sample_gives_k_distinct_samples_and_restores_train_mode(captioner, tok):
    m, vt = captioner
    cfg = GenerationConfig(candidates=5, max_len=4, strategy="sample", temperature=1.0, top_k=0)
    rollout = Rollout(cfg, tok, generator=torch.Generator().manual_seed(0))
    got = rollout.candidates(m, vt)
    assert m.training and not m.image_encoder.training
    assert got.shape == (10, 5) and (got[:, 0] == tok.bos).all()
    for b in range(2):
        assert len({tuple(r) for r in got[5 * b:5 * b + 5].tolist()}) == 5
    again = Rollout(cfg, tok, generator=torch.Generator().manual_seed(0)).candidates(m, vt)
    assert torch.equal(again, got)  # eval mode: dropout does not touch the draws


# ---- config -----------------------------------------------------------------------------------------------------

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


@pytest.mark.parametrize("override,needle", [
    ("generation.strategy=greedy", "'generation.strategy': 'greedy' is not beam or sample"),
    ("generation.temperature=0", "'generation.temperature': 0.0 must lie in [0.0001, 10000.0]"),
    ("generation.temperature=-1", "'generation.temperature': -1.0 must lie in [0.0001, 10000.0]"),
    ("generation.top_k=-1", "'generation.top_k': -1 must be >= 0"),
    ("generation.early_stopping=maybe", "'generation.early_stopping': 'maybe' is not false, true or never"),
    ("generation.early_stopping=1", "'generation.early_stopping': '1' is not false, true or never"),
    ("generation.repetition_penalty=0", "'generation.repetition_penalty': 0.0 must lie in (0, 10]"),
    ("generation.repetition_penalty=11", "'generation.repetition_penalty': 11.0 must lie in (0, 10]"),
    ("generation.no_repeat_ngram_size=-1", "'generation.no_repeat_ngram_size': -1 must be >= 0"),
])
def test_bad_generation_keys_fail_with_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo/dico.yaml", BLANK + [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_early_stopping_loads_as_generate_spells_it():
    for value, want in (("true", "true"), ("False", "false"), ("NEVER", "never")):
        g = load_config("configs/demo/dico.yaml", BLANK + [f"generation.early_stopping={value}"]).generation
        assert g.early_stopping == want
    assert GenerationConfig().early_stopping == "false"  # generate's default, and the DiCO reference's


def test_sampling_config_loads():
    g = load_config("configs/demo/dico.yaml", BLANK + ["generation.strategy=sample", "generation.temperature=0.7",
                                                       "generation.top_k=40"]).generation
    assert (g.strategy, g.temperature, g.top_k) == ("sample", 0.7, 40)
    assert math.isclose(GenerationConfig().temperature, 1.0) and GenerationConfig().strategy == "beam"


def test_rollout_beam_ranks_by_the_configured_length_penalty(captioner, tok):
    """A length penalty far below 0 favours short candidates, far above 0 long ones: the rollout must pass it on."""
    m, vt = captioner
    logits, lengths = m.logits, {}
    m.logits = lambda h: logits(h) + (torch.arange(tok.vocab_size) == tok.eos)  # EOS likelier: mixed lengths
    try:
        for lp in (-4.0, 0.0, 4.0):
            got = Rollout(GenerationConfig(candidates=3, max_len=8, length_penalty=lp), tok).candidates(m, vt)
            lengths[lp] = scored_mask(got[:, 1:], tok.eos).sum(-1).tolist()
    finally:
        del m.logits
    assert sum(lengths[-4.0]) <= sum(lengths[0.0]) < sum(lengths[4.0])


def test_rollout_beam_stops_by_the_configured_early_stopping(captioner, tok):
    """With long candidates favoured (length penalty 4), early_stopping true stops once k have ended (shorter
    candidates), "never" keeps searching longer than false's heuristic: the rollout must pass it on."""
    m, vt = captioner
    logits, lengths = m.logits, {}
    m.logits = lambda h: logits(h) + (torch.arange(tok.vocab_size) == tok.eos)  # EOS likelier: mixed lengths
    try:
        for stop in ("true", "false", "never"):
            g = GenerationConfig(candidates=3, max_len=8, length_penalty=4.0, early_stopping=stop)
            got = Rollout(g, tok).candidates(m, vt)
            m.eval()
            want, _ = beam_search(m, m.image_context(vt), 3, 8, tok.bos, tok.eos, tok.pad, 4.0, stop)
            m.train()
            assert torch.equal(got, want.flatten(0, 1))
            lengths[stop] = scored_mask(got[:, 1:], tok.eos).sum(-1).tolist()
    finally:
        del m.logits
    assert sum(lengths["true"]) < sum(lengths["false"]) < sum(lengths["never"])


def test_rollout_beam_applies_the_configured_repetition_options(captioner, tok):
    """no_repeat_ngram_size=1 (no token twice) and a strong repetition penalty: the rollout's candidates are the
    search's with those options, and no candidate repeats a token where the plain search's do."""
    m, vt = captioner

    def repeats(rows):  # tokens that occur again in their own caption (EOS included), over all candidates
        lengths = scored_mask(rows[:, 1:], tok.eos).sum(-1).tolist()
        return sum(n - len(set(r[1:n + 1])) for r, n in zip(rows.tolist(), lengths))
    plain = Rollout(GenerationConfig(candidates=3, max_len=8), tok).candidates(m, vt)
    assert repeats(plain) > 0
    for options, most in (({"no_repeat_ngram_size": 1}, 0), ({"repetition_penalty": 10.0}, repeats(plain) - 1)):
        got = Rollout(GenerationConfig(candidates=3, max_len=8, **options), tok).candidates(m, vt)
        m.eval()
        want, _ = beam_search(m, m.image_context(vt), 3, 8, tok.bos, tok.eos, tok.pad, **options)
        m.train()
        assert torch.equal(got, want.flatten(0, 1)) and repeats(got) <= most, options
