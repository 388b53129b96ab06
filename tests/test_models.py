"""Tokenizer, captioner, beam search, evaluator and CLIP checkpoint formats, on real (randomly initialised) models."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from dico_scale.config import CaptionerConfig, ConfigError, EvaluatorConfig
from dico_scale.data.tokenizer import CaptionTokenizer
from dico_scale.models.builtin import Captioner
from dico_scale.models.captioner import disable_dropout, scored_mask
from dico_scale.models.clip import create_clip
from dico_scale.models.clip_scorer import ClipScorer
from dico_scale.models.generation import beam_search

TINY = dict(image_encoder="dico-tiny", width=64, heads=4, encoder_layers=1, decoder_layers=1)
CAPTIONS = ["a red circle", "a large blue square at the top left", "two shapes on a dark background",
            "there is an orange star in the center", "a small green cross"]


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


def make_captioner(tok, seed=0, **kw) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(CaptionerConfig(**{**TINY, **kw}), tok)


def pixels(n, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def one_line(msg: str):
    assert msg.strip() and "\n" not in msg, repr(msg)


# ---- tokenizer -------------------------------------------------------------------------------------------------------

def test_tokenizer_ids(tok):
    assert (tok.bos, tok.eos, tok.pad, tok.vocab_size) == (49406, 49407, 49408, 49409)
    ids = tok.encode("a red circle", 24)
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 5
    assert 49408 not in ids and 49406 not in ids[1:] and 49407 not in ids[:-1]


def test_tokenizer_truncation_keeps_bos_and_eos(tok):
    long = " ".join(["red circle"] * 30)
    full = tok.encode(long, 1000)
    for n in (2, 3, 10, 24):
        ids = tok.encode(long, n)
        assert len(ids) == n and ids[0] == tok.bos and ids[-1] == tok.eos
        assert ids[1:-1] == full[1:n - 1]  # the first words, in order
    assert tok.encode("a red circle", 24) == tok.encode("a red circle", 5)  # fits exactly: untouched


def test_tokenizer_batch_pads(tok):
    out = tok.batch(["a red circle", "a large blue square at the top left", "star"], 24)
    assert out.dtype == torch.long
    rows = [tok.encode(c, 24) for c in ["a red circle", "a large blue square at the top left", "star"]]
    assert out.shape == (3, max(map(len, rows)))
    for i, r in enumerate(rows):
        assert out[i, :len(r)].tolist() == r
        assert (out[i, len(r):] == tok.pad).all()
    assert (out[:, 0] == tok.bos).all()
    assert tok.batch(["x " * 50], 7).shape == (1, 7)


@pytest.mark.parametrize("text", CAPTIONS)
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok.encode(text, 64)) == text
    assert tok.decode(torch.tensor(tok.encode(text, 64))) == text
    assert tok.decode(tok.encode(text.upper(), 64)) == text  # CLIP's BPE lowercases


def test_tokenizer_decode_stops_at_eos_and_pad(tok):
    red, circle = tok.encode("red circle", 8)[1:-1]
    assert tok.decode([tok.bos, red, tok.eos, circle]) == "red"
    assert tok.decode([tok.bos, red, tok.pad, circle]) == "red"
    assert tok.decode([tok.bos, red, circle, tok.eos, tok.pad, tok.pad]) == "red circle"
    assert tok.decode([tok.bos, tok.eos]) == ""
    batch = torch.tensor([[tok.bos, red, tok.eos, tok.pad], [tok.bos, circle, red, tok.eos]])
    assert tok.decode_batch(batch) == ["red", "circle red"]


# ---- captioner -------------------------------------------------------------------------------------------------------

def test_captioner_forward_shape(tok):
    m = make_captioner(tok).eval()
    tokens = tok.batch(CAPTIONS[:3], 16)
    logits = m(tokens, pixels=pixels(3))
    assert logits.shape == (3, tokens.size(1) - 1, tok.vocab_size)
    assert torch.isfinite(logits).all()
    # teacher forcing is causal: changing a later token leaves earlier logits alone
    t2 = tokens.clone()
    t2[:, -1] = 320
    assert torch.allclose(m(t2, pixels=pixels(3))[:, :-1], logits[:, :-1], atol=1e-5)
    # the image matters
    assert not torch.allclose(m(tokens, pixels=pixels(3, seed=9)), logits, atol=1e-4)


def test_frozen_image_encoder_gets_no_gradient(tok):
    m = make_captioner(tok).train()
    enc = list(m.image_encoder.parameters())
    assert enc and not any(p.requires_grad for p in enc)
    tokens = tok.batch(CAPTIONS[:2], 16)
    logits = m(tokens, pixels=pixels(2))
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), ignore_index=tok.pad).backward()
    assert all(p.grad is None for p in enc)
    trainable = [p for n, p in m.named_parameters() if not n.startswith("image_encoder.")]
    assert all(p.requires_grad for p in trainable)
    assert m.visual_proj[0].weight.grad is not None and m.visual_proj[0].weight.grad.abs().sum() > 0
    assert m.decoder.wte.weight.grad is not None


def test_unfrozen_image_encoder_trains(tok):
    m = make_captioner(tok, freeze_image_encoder=False).train()
    assert all(p.requires_grad for p in m.image_encoder.parameters())
    assert m.image_encoder.training
    tokens = tok.batch(CAPTIONS[:2], 16)
    logits = m(tokens, pixels=pixels(2))
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), ignore_index=tok.pad).backward()
    g = m.image_encoder.conv1.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_train_mode_keeps_frozen_tower_in_eval(tok):
    m = make_captioner(tok)
    m.train()
    assert m.training and m.decoder.training and m.encoder.training
    assert not any(mod.training for mod in m.image_encoder.modules())
    m.eval()
    assert not any(mod.training for mod in m.modules())
    m.train(True)
    assert not m.image_encoder.training and m.decoder.training


def test_repeats_equal_explicit_repetition(tok):
    m = make_captioner(tok).eval()
    k = 3
    tokens = tok.batch((CAPTIONS * 2)[:2 * k], 16)  # 2 images x 3 rows
    with torch.no_grad():
        vt = m.visual_tokens(pixels(2))
        a = m(tokens, visual_tokens=vt, repeats=k)
        b = m(tokens, visual_tokens=vt.repeat_interleave(k, dim=0))
        c = m(tokens, pixels=pixels(2).repeat_interleave(k, dim=0))
        wrong = m(tokens, visual_tokens=vt.repeat(k, 1, 1))  # tiled, not interleaved
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, c, atol=1e-4)
    assert not torch.allclose(a, wrong, atol=1e-4)


def test_disable_dropout(tok):
    m = make_captioner(tok, dropout=0.3).train()
    tokens = tok.batch(CAPTIONS[:2], 16)
    px = pixels(2)
    torch.manual_seed(0)
    a, b = m(tokens, pixels=px), m(tokens, pixels=px)
    assert not torch.allclose(a, b, atol=1e-4)
    disable_dropout(m)
    m.train()
    a, b = m(tokens, pixels=px), m(tokens, pixels=px)
    assert torch.equal(a, b)
    with torch.no_grad():
        ref = m.eval()(tokens, pixels=px)
    assert torch.allclose(a, ref, atol=1e-5)


def test_disable_dropout_covers_every_rate(tok):
    m = make_captioner(tok, dropout=0.3)
    disable_dropout(m)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            assert mod.p == 0.0
        if isinstance(mod, torch.nn.MultiheadAttention):
            assert mod.dropout == 0.0


# ---- beam search -----------------------------------------------------------------------------------------------------

def _shaped(m: Captioner, tok, s: float, c: float, a: float, x: float):
    """Makes a random decoder's next-token distribution peaked (token embeddings scaled by s), EOS more likely as the
    position grows (coordinate 0 carries only the position, c per step, and EOS reads only it, weight a), and the
    image matter more (cross-attention output scaled by x): beams of one image then finish at different lengths."""
    with torch.no_grad():
        w = m.decoder.wte.weight
        w.mul_(s)
        w[:, 0] = 0
        w[tok.eos] = 0
        w[tok.eos, 0] = a
        m.decoder.wpe.weight[:, 0] = c * torch.arange(m.decoder.wpe.weight.size(0)).float()
        m.decoder.h[0].crossattention.c_proj.weight.mul_(x)


@pytest.fixture(scope="module")
def shaped(tok):
    """(captioner, memory [3, P, width], visual tokens): eval mode, beams (k=4, max_len=8) of mixed lengths."""
    base = make_captioner(tok, seed=0).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for s, c, a, x in [(40, 2.0, 6, 20), (40, 1.0, 10, 20), (40, 2.0, 10, 20), (40, 1.0, 6, 20)]:
        base.load_state_dict(state)
        _shaped(base, tok, s, c, a, x)
        with torch.no_grad():
            vt = base.visual_tokens(pixels(3))
            mem = base.image_context(vt)
        toks, _ = beam_search(base, mem, 4, 8, tok.bos, tok.eos, tok.pad)
        lengths = (toks != tok.pad).sum(-1)  # BOS .. EOS (or the end)
        if (lengths < toks.size(-1)).any() and lengths.unique().numel() >= 2 and not torch.equal(toks[0], toks[1]):
            return base, mem, vt
    pytest.fail("could not shape a random captioner into mixed-length beams")


def teacher_forced_scores(m, tok, tokens, vt, k):
    """Summed log-probs of tokens[:, 1:] over non-pad positions, from the plain forward pass."""
    flat = tokens.reshape(-1, tokens.size(-1))
    with torch.no_grad():
        logp = torch.log_softmax(m(flat, visual_tokens=vt, repeats=k).double(), dim=-1)
    tgt = flat[:, 1:]
    lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (lp * (tgt != tok.pad)).sum(-1).view(tokens.shape[:2])


def _check_beams(tokens, scores, tok, B, k, max_len, length_penalty=1.0):
    assert tokens.shape[:2] == (B, k) and 2 <= tokens.size(2) <= max_len + 1 and scores.shape == (B, k)
    assert (tokens[:, :, 0] == tok.bos).all()
    assert torch.isfinite(scores).all()
    ranked = scores / scored_mask(tokens[:, :, 1:], tok.eos).sum(-1) ** length_penalty
    assert (ranked[:, :-1] >= ranked[:, 1:] - 1e-6).all()  # best first
    for b in range(B):
        rows = {tuple(r) for r in tokens[b].tolist()}
        assert len(rows) == k, "beams of one image must differ"
    for row in tokens.reshape(-1, tokens.size(-1)).tolist():
        body = row[1:]
        end = body.index(tok.eos) if tok.eos in body else len(body)
        assert tok.pad not in body[:end] and tok.bos not in body[:end]
        assert all(t == tok.pad for t in body[end + 1:]), "only PAD after EOS"


def test_beam_search_scores_are_teacher_forced_log_probs(shaped, tok):
    m, mem, vt = shaped
    k, max_len = 4, 8
    tokens, scores = beam_search(m, mem, k, max_len, tok.bos, tok.eos, tok.pad)
    _check_beams(tokens, scores, tok, 3, k, max_len)
    tf = teacher_forced_scores(m, tok, tokens, vt, k)
    assert torch.allclose(scores.double(), tf, rtol=1e-4, atol=1e-3), (scores, tf)
    assert ((tokens == tok.eos).any(-1)).any() and (tokens == tok.pad).any()  # the fixture's point
    # images are searched independently of each other
    one, one_scores = beam_search(m, mem[1:2], k, max_len, tok.bos, tok.eos, tok.pad)
    assert torch.equal(one[0], tokens[1, :, :one.size(-1)]) and (tokens[1, :, one.size(-1):] == tok.pad).all()
    assert torch.allclose(one_scores[0], scores[1], atol=1e-4)


def test_beam_search_never_emits_bos_or_pad(tok):
    """BOS and PAD are made the argmax of every step: the search must still pick other tokens, scored unmasked."""
    m = make_captioner(tok, seed=3).eval()
    u = F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():
        m.decoder.ln_f.bias.add_(4 * u)
        m.decoder.wte.weight[tok.bos] = 4 * u
        m.decoder.wte.weight[tok.pad] = 4 * u
        vt = m.visual_tokens(pixels(2))
        mem = m.image_context(vt)
    tokens, scores = beam_search(m, mem, 3, 4, tok.bos, tok.eos, tok.pad)
    _check_beams(tokens, scores, tok, 2, 3, 4)
    assert tokens.shape == (2, 3, 5) and not ((tokens[:, :, 1:] == tok.bos) | (tokens[:, :, 1:] == tok.pad)).any()
    flat = tokens.reshape(6, -1)
    with torch.no_grad():
        argmax = m(flat, visual_tokens=vt, repeats=3).argmax(-1)
    assert ((argmax == tok.bos) | (argmax == tok.pad)).all()  # what an unmasked search would have emitted
    assert torch.allclose(scores.double(), teacher_forced_scores(m, tok, tokens, vt, 3), rtol=1e-4, atol=1e-3)


def test_beam_search_random_model(tok):
    """An untouched random captioner: no beam finishes, all run to max_len."""
    m = make_captioner(tok, seed=5).eval()
    with torch.no_grad():
        vt = m.visual_tokens(pixels(2))
        mem = m.image_context(vt)
    tokens, scores = beam_search(m, mem, 3, 5, tok.bos, tok.eos, tok.pad)
    assert tokens.shape == (2, 3, 6)
    _check_beams(tokens, scores, tok, 2, 3, 5)
    assert torch.allclose(scores.double(), teacher_forced_scores(m, tok, tokens, vt, 3), rtol=1e-4, atol=1e-3)


def test_beam_search_max_len_one(shaped, tok):
    m, mem, vt = shaped
    tokens, scores = beam_search(m, mem, 4, 1, tok.bos, tok.eos, tok.pad)
    assert tokens.shape == (3, 4, 2)
    _check_beams(tokens, scores, tok, 3, 4, 1)
    with torch.no_grad():
        logp = torch.log_softmax(m.logits(m.decoder_hidden(torch.full((3, 1), tok.bos), mem))[:, -1].float(), -1)
    logp[:, [tok.bos, tok.pad]] = float("-inf")
    top, idx = logp.topk(4, dim=-1)
    assert torch.equal(tokens[:, :, 1], idx)
    assert torch.allclose(scores, top, atol=1e-5)


def greedy(m, tok, mem, max_len):
    """Plain loop, full forward each step, no cache."""
    seq = torch.full((mem.size(0), 1), tok.bos)
    done = torch.zeros(mem.size(0), dtype=torch.bool)
    total = torch.zeros(mem.size(0), dtype=torch.float64)
    with torch.no_grad():
        for _ in range(max_len):
            logp = torch.log_softmax(m.logits(m.decoder_hidden(seq, mem))[:, -1].double(), -1)
            logp[:, [tok.bos, tok.pad]] = float("-inf")
            nxt = logp.argmax(-1)
            total += torch.where(done, 0.0, logp.gather(-1, nxt[:, None]).squeeze(-1))
            nxt[done] = tok.pad
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == tok.eos
            if done.all():
                break
    return seq, total


def test_beam_size_one_is_greedy(shaped, tok):
    m, mem, _ = shaped
    for max_len in (8, 3):
        tokens, scores = beam_search(m, mem, 1, max_len, tok.bos, tok.eos, tok.pad)
        seq, total = greedy(m, tok, mem, max_len)
        assert tokens.shape == (3, 1, seq.size(1))
        assert torch.equal(tokens[:, 0], seq)
        assert torch.allclose(scores[:, 0].double(), total, atol=1e-3)


def test_cached_decode_equals_full_forward(shaped, tok):
    m, mem, _ = shaped
    tokens = tok.batch(CAPTIONS[:3], 12)
    with torch.no_grad():
        full = m.decoder_hidden(tokens, mem)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        steps = [m.decoder_hidden(tokens[:, t:t + 1], mem, cache=cache)[:, -1] for t in range(tokens.size(1))]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4)
    # and the cache reorders like the beams do
    with torch.no_grad():
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        m.decoder_hidden(tokens[:, :4], mem, cache=cache)
        perm = torch.tensor([2, 0, 1])
        cache.reorder_cache(perm)
        step = m.decoder_hidden(tokens[perm, 4:5], mem[perm], cache=cache)[:, -1]
    assert torch.allclose(step, full[perm, 4], atol=1e-4)


# ---- evaluator -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluators():
    torch.manual_seed(0)
    clips = ClipScorer(EvaluatorConfig(model="dico-tiny", metric="clips"))
    pacs = ClipScorer(EvaluatorConfig(model="dico-tiny", metric="pacs"))
    pacs.clip.load_state_dict(clips.clip.state_dict())
    return clips, pacs


def _reference_cos(ev, px, captions):
    tokens = open_clip.get_tokenizer("dico-tiny")(captions)
    with torch.no_grad():
        img = ev.clip.encode_image(px).double()
        txt = ev.clip.encode_text(tokens).double()
    return F.cosine_similarity(img, txt, dim=-1)


def test_evaluator_scores(evaluators):
    clips, pacs = evaluators
    assert not clips.clip.training and not any(p.requires_grad for p in clips.clip.parameters())
    px = pixels(5, seed=4)
    cos = _reference_cos(clips, px, CAPTIONS)
    feats = clips.image_features(px)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)
    s_clips = clips.score(feats, CAPTIONS).double()
    s_pacs = pacs.score(pacs.image_features(px), CAPTIONS).double()
    assert torch.allclose(s_clips, 2.5 * cos.clamp(min=0), atol=1e-5)
    assert torch.allclose(s_pacs, 2.0 * cos.clamp(min=0), atol=1e-5)
    # exact values at the extremes: the same direction scores the full weight, the opposite one clamps to 0
    text = clips.text_features(CAPTIONS[:2])
    assert torch.allclose(clips.score(text, CAPTIONS[:2]), torch.full((2,), 2.5), atol=1e-5)
    assert torch.allclose(pacs.score(text, CAPTIONS[:2]), torch.full((2,), 2.0), atol=1e-5)
    assert torch.equal(clips.score(-text, CAPTIONS[:2]), torch.zeros(2))
    # partially negative: clamped per row, not as a whole
    mixed = torch.stack([text[0], -text[1]])
    assert torch.allclose(clips.score(mixed, CAPTIONS[:2]), torch.tensor([2.5, 0.0]), atol=1e-5)


def test_evaluator_caption_prefix(evaluators):
    clips, _ = evaluators
    torch.manual_seed(1)
    pre = ClipScorer(EvaluatorConfig(model="dico-tiny", metric="clips", caption_prefix="A photo depicts "))
    pre.clip.load_state_dict(clips.clip.state_dict())
    a = pre.text_features(["a red circle"])
    assert torch.allclose(a, clips.text_features(["A photo depicts a red circle"]), atol=1e-6)
    assert not torch.allclose(a, clips.text_features(["a red circle"]), atol=1e-3)


def test_random_evaluator_is_the_same_in_every_process():
    """A frozen evaluator without a weights file is one random CLIP wherever it is built (the trainer builds it after
    the captioner, evaluate and the held-out tables from other points of the global stream); the evaluator stage's
    trainable start follows the run's seed, and building leaves the global stream as it was."""
    cfg = EvaluatorConfig(model="dico-tiny", metric="clips")
    torch.manual_seed(0)
    first = ClipScorer(cfg).clip.state_dict()
    torch.manual_seed(123)
    torch.rand(1000)
    after = torch.get_rng_state()
    second = ClipScorer(cfg).clip.state_dict()
    assert torch.equal(torch.get_rng_state(), after)
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(1)
    one = ClipScorer(cfg, trainable=True).clip.state_dict()
    torch.manual_seed(2)
    two = ClipScorer(cfg, trainable=True).clip.state_dict()
    assert not torch.equal(one["text_projection"], two["text_projection"])


# ---- CLIP checkpoint formats (PAC-S / open_clip / DeepSpeed export) -----------------------------------------------

def _features(model):
    with torch.no_grad():
        return (model.encode_image(pixels(2, seed=7)),
                model.encode_text(open_clip.get_tokenizer("dico-tiny")(["a red circle", "two shapes"])))


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(11)
    model, _ = create_clip("dico-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))
    return model.eval()


@pytest.mark.parametrize("layout", ["state_dict", "module_prefix", "scalar_logit_scale", "module_and_scalar",
                                    "bare"])
def test_clip_checkpoint_layouts(tiny_clip, tmp_path, layout):
    sd = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    if "scalar" in layout:
        sd["logit_scale"] = sd["logit_scale"].reshape(())
        assert sd["logit_scale"].ndim == 0
    if "module" in layout:
        sd = {"module." + k: v for k, v in sd.items()}
    path = tmp_path / "clip.pt"
    torch.save(sd if layout == "bare" else {"state_dict": sd}, path)
    torch.manual_seed(99)
    fresh, _ = create_clip("dico-tiny")
    assert not torch.allclose(_features(fresh)[0], _features(tiny_clip)[0])  # a different random init
    torch.manual_seed(99)
    loaded, _ = create_clip("dico-tiny", weights=str(path))
    loaded.eval()
    for a, b in zip(_features(loaded), _features(tiny_clip)):
        assert torch.equal(a, b)
    assert loaded.logit_scale.shape == (1,)
    assert loaded.logit_scale.item() == pytest.approx(math.log(42.0))
    ref = tiny_clip.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_create_clip_leaves_logging_alone():
    import logging

    root = logging.getLogger()
    old = root.level
    try:
        root.setLevel(logging.WARNING)
        create_clip("dico-tiny")
        assert root.level == logging.WARNING
        assert logging.getLogger("dico_scale.data.pipeline").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(old)


def test_save_clip_round_trip(tiny_clip, tmp_path):
    from dico_scale.models.clip import save_clip

    path = tmp_path / "saved.pt"
    save_clip(tiny_clip, str(path))
    assert not (tmp_path / "saved.pt.tmp").exists()
    loaded, _ = create_clip("dico-tiny", weights=str(path))
    for a, b in zip(_features(loaded.eval()), _features(tiny_clip)):
        assert torch.equal(a, b)


def test_clip_bad_checkpoints(tiny_clip, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ConfigError) as ei:
        create_clip("dico-tiny", weights=str(corrupt))
    one_line(str(ei.value))
    assert "corrupt.pt" in str(ei.value)

    sd = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    sd["visual.conv1.weight"] = torch.zeros(96, 3, 8, 8)  # another width
    wrong = tmp_path / "wrong_width.pt"
    torch.save({"state_dict": sd}, wrong)
    with pytest.raises(ConfigError) as ei:
        create_clip("dico-tiny", weights=str(wrong))
    one_line(str(ei.value))
    assert "wrong_width.pt" in str(ei.value)

    partial = tmp_path / "missing_keys.pt"
    torch.save({"state_dict": {k: v for k, v in tiny_clip.state_dict().items() if not k.startswith("transformer.")}},
               partial)
    with pytest.raises(ConfigError) as ei:
        create_clip("dico-tiny", weights=str(partial))
    one_line(str(ei.value))
    assert "missing_keys.pt" in str(ei.value)

    with pytest.raises(ConfigError) as ei:
        create_clip("dico-tiny", weights=str(tmp_path / "absent.pt"))
    one_line(str(ei.value))
    assert "absent.pt" in str(ei.value)

    with pytest.raises(ConfigError) as ei:
        create_clip("no-such-clip-model")
    one_line(str(ei.value))
    assert "no-such-clip-model" in str(ei.value)


def test_pacs_architecture_checkpoint(tmp_path):
    """The real PAC-S layout: ViT-B-32-quickgelu, OpenAI key names, {'state_dict': ...}, 0-d logit_scale."""
    torch.manual_seed(21)
    src = open_clip.create_model("ViT-B-32-quickgelu").eval()
    sd = src.state_dict()
    assert sd["logit_scale"].ndim == 0 and "visual.conv1.weight" in sd and "transformer.resblocks.0.attn.in_proj_weight" in sd
    path = tmp_path / "pacs_vitb32.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    del sd
    torch.manual_seed(22)
    loaded, _ = create_clip("ViT-B-32-quickgelu", weights=str(path))
    text = open_clip.get_tokenizer("ViT-B-32-quickgelu")(["a red circle", "a photo of a dog"])
    with torch.no_grad():
        a, b = loaded.eval().encode_text(text), src.encode_text(text)
    assert torch.equal(a, b)
    assert loaded.logit_scale.shape == (1,) and loaded.logit_scale.item() == pytest.approx(src.logit_scale.item())


# ---- models.weights.load_weights ------------------------------------------------------------------------------------

def test_load_weights_round_trip(tok, tmp_path):
    from dico_scale.models.weights import load_weights

    src = make_captioner(tok, seed=1).eval()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": src.state_dict(), "stage": "xe"}, path)
    dst = make_captioner(tok, seed=2).eval()
    tokens = tok.batch(CAPTIONS[:2], 16)
    with torch.no_grad():
        assert not torch.allclose(dst(tokens, pixels=pixels(2)), src(tokens, pixels=pixels(2)))
    load_weights(dst, str(path))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(dst(tokens, pixels=pixels(2)), src(tokens, pixels=pixels(2)))


def test_load_weights_mismatch(tok, tmp_path):
    from dico_scale.models.weights import load_weights

    other = make_captioner(tok, seed=1, width=32)
    path = tmp_path / "other_width.pt"
    torch.save({"state_dict": other.state_dict()}, path)
    dst = make_captioner(tok, seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ConfigError) as ei:
        load_weights(dst, str(path))
    one_line(str(ei.value))
    assert "other_width.pt" in str(ei.value)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # left untouched

    missing = tmp_path / "missing.pt"
    sd = dst.state_dict()
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("decoder.")}}, missing)
    with pytest.raises(ConfigError) as ei:
        load_weights(dst, str(missing))
    one_line(str(ei.value))
    assert "missing.pt" in str(ei.value)

    no_dict = tmp_path / "no_state_dict.pt"
    torch.save(dict(sd), no_dict)
    with pytest.raises(ConfigError) as ei:
        load_weights(dst, str(no_dict))
    one_line(str(ei.value))
    assert "no_state_dict.pt" in str(ei.value)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tok):
    """Recomputation in backward (dropout on: the RNG state is replayed) changes no number."""
    from dico_scale.config import CaptionerConfig

    def run(ckpt: bool):
        torch.manual_seed(0)
        m = Captioner(CaptionerConfig(**{**TINY, "dropout": 0.1, "gradient_checkpointing": ckpt,
                                         "freeze_image_encoder": False}), tok).train()
        torch.manual_seed(1)
        pixels = torch.randn(2, 3, 64, 64)
        tokens = torch.randint(0, 100, (2, 7))
        saved = []  # elements autograd keeps for backward: what checkpointing trades for recomputation
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logits = m(tokens, pixels=pixels)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, sum(saved)

    loss, grads, saved = run(False)
    loss_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert saved_ckpt < 0.7 * saved, (saved_ckpt, saved)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys() and any(n.startswith("image_encoder.") for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(grads_ckpt[n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_processed_scores_follow_generates_logits_processors():
    """repetition_penalty: a token seen in the row (prompt or caption; -1 is padding) is penalised, negative
    scores multiplied, positive divided; no_repeat_ngram_size: the token completing an n-gram seen before is banned,
    an n-gram through padding never counts. Both against transformers' own processors."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from dico_scale.models.generation import processed

    scores = torch.tensor([[-1.0, 2.0, -3.0, 4.0, -0.5], [0.5, -1.0, 1.5, -2.0, 3.0]])
    seen = torch.tensor([[1, 2, 1, 2], [-1, 3, 4, 3]])  # row 2: left-padded
    want = torch.tensor([[-1.0, 1.0, -6.0, 4.0, -0.5], [0.5, -1.0, 1.5, -4.0, 1.5]])
    assert torch.equal(processed(scores, seen, 2.0, 0), want)
    real = seen[:1]  # without padding, transformers' processors give the same
    theirs = RepetitionPenaltyLogitsProcessor(2.0)(real, scores[:1].clone())
    assert torch.equal(processed(scores[:1], real, 2.0, 0), theirs)
    banned = processed(scores, seen, 1.0, 2)  # row 1 ends "2", and "2 1" came before: 1 banned; row 2: "3 4"
    assert banned.isinf().nonzero().tolist() == [[0, 1], [1, 4]]
    for n in (2, 3):
        theirs = NoRepeatNGramLogitsProcessor(n)(real, scores[:1].clone())
        assert torch.equal(processed(scores[:1], real, 1.0, n), theirs)
    padded = torch.tensor([[-1, -1, 7], [7, 7, 7]])  # a 2-gram "-1 -1" is not one; "7 7" is
    assert processed(torch.zeros(2, 8), padded, 1.0, 2).isinf().nonzero().tolist() == [[1, 7]]
    assert torch.equal(processed(scores, seen[:, :1], 1.0, 3), scores)  # shorter than n - 1: nothing banned
