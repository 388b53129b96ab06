"""The Hugging Face captioner row (models/hf_encoder_decoder.py) against transformers itself, on tiny random folders
written by dico_scale.models.tiny: our beam search's best beam equals `generate`'s, our teacher-forced log-probs
equal log_softmax of the model's own logits, the fused head (Triton interpreter, untied or biased weight) equals the
torch path, and an export's save_pretrained folder generates the same captions."""
import json
from pathlib import Path

import pytest
import torch
from helpers import caption_with_specials_as_text

from dico_scale.config import ConfigError, load_config
from dico_scale.models import build_captioner
from dico_scale.models.captioner import banned_tokens, scored_mask
from dico_scale.models.generation import beam_search
from dico_scale.models.tiny import write

FAMILIES = ("vit-gpt2", "blip")
BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
CAPTIONS = ["a red circle at the top", "two shapes: a blue star and a small green square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: write(f, str(root / f)) for f in FAMILIES}


def hf_config(path: str, *extra: str):
    return load_config("configs/demo/xe.yaml", BLANK + ["captioner.model=hf_encoder_decoder",
                                                        f"captioner.hf_path={path}", *extra])


def captioner(folders, family, untie=False):
    cap = build_captioner(hf_config(folders[family])).eval()
    if untie:  # a head of its own, away from the embedding (GPT-2's tied random head just repeats its input)
        head = cap.head
        head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)))
    return cap


def pixels(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def hf_logits(cap, px, inputs):
    if cap.tower_prefix == "model.vision_model.":
        return cap.model(pixel_values=px, input_ids=inputs).logits
    return cap.model(pixel_values=px, decoder_input_ids=inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_beams_equal_transformers_generate(folders, family):
    """All k candidates in generate's order, at the reference's length penalty (1.0) and at summed log-probs (0.0)."""
    cap, k, max_len = captioner(folders, family, untie=True), 3, 8
    tok, px = cap.tokenizer, pixels()
    banned = [[t] for t in banned_tokens(tok.bos, tok.eos, tok.pad)]  # ours never proposes BOS / PAD
    for lp in (1.0, 0.0):
        with torch.no_grad():
            ours, _ = beam_search(cap, cap.image_context(cap.visual_tokens(px)), k, max_len, tok.bos, tok.eos,
                                  tok.pad, lp)
            theirs = cap.model.generate(pixel_values=px, num_beams=k, num_return_sequences=k, length_penalty=lp,
                                        max_new_tokens=max_len, do_sample=False,
                                        **({"bad_words_ids": banned} if banned else {}))
        theirs = theirs.view(px.size(0), k, -1)
        assert tok.decode_batch(ours.flatten(0, 1)) == tok.decode_batch(theirs.flatten(0, 1))
        assert any(len(c) > 0 for c in tok.decode_batch(theirs[:, 0]))  # a real search, not EOS at once
        for a, b in zip(ours.flatten(0, 1), theirs.flatten(0, 1)):
            n = int(scored_mask(b[None, 1:], tok.eos).sum())
            assert a[: n + 1].tolist() == b[: n + 1].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_repetition_options_equal_transformers_generate(folders, family):
    """generate's repetition_penalty and no_repeat_ngram_size over the decoder's tokens (from its start token), on
    beam search's log-probs (k = 3) and greedy search's logits (k = 1): the same captions, which the options change
    (greedily with the tied random head, which repeats its input)."""
    for untie, k in ((True, 3), (False, 1)):
        cap = captioner(folders, family, untie=untie)
        tok, px = cap.tokenizer, pixels()
        banned = [[t] for t in banned_tokens(tok.bos, tok.eos, tok.pad)]
        got = []
        for options in ({}, {"repetition_penalty": 2.0}, {"no_repeat_ngram_size": 1}):
            with torch.no_grad():
                ours, _ = beam_search(cap, cap.image_context(cap.visual_tokens(px)), k, 8, tok.bos, tok.eos,
                                      tok.pad, **options)
                theirs = cap.model.generate(pixel_values=px, num_beams=k, num_return_sequences=k, max_new_tokens=8,
                                            do_sample=False, **({"bad_words_ids": banned} if banned else {}),
                                            **options)
            got.append(tok.decode_batch(ours.flatten(0, 1)))
            assert got[-1] == tok.decode_batch(theirs), (k, options)
        assert got[0] != got[1] and got[0] != got[2], k


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_logprobs_equal_gathered_log_softmax(folders, family):
    cap = captioner(folders, family)
    tok, px = cap.tokenizer, pixels()
    tokens = tok.batch(CAPTIONS, 40)
    labels = tokens[:, 1:]
    with torch.no_grad():
        ours = cap(tokens, pixels=px, output="logprobs", kernel="torch")
        logp = torch.log_softmax(hf_logits(cap, px, tokens[:, :-1]).double(), -1)
    want = (logp.gather(-1, labels[..., None])[..., 0] * scored_mask(labels, tok.eos)).sum(-1)
    torch.testing.assert_close(ours.double(), want, rtol=0, atol=1e-4)
    assert tok.decode_batch(tokens) == CAPTIONS


def test_the_attention_implementation_reaches_encoder_and_decoder(folders):
    """captioner.attn_implementation=eager on ViT + GPT-2 (sdpa by default): both halves take it, same log-probs;
    BLIP has eager attention only, and asking it for sdpa is one line naming the key."""
    px, got = pixels(), {}
    for extra in ([], ["captioner.attn_implementation=eager"]):
        cap = build_captioner(hf_config(folders["vit-gpt2"], *extra)).eval()
        tokens = cap.tokenizer.batch(CAPTIONS, 40)
        with torch.no_grad():
            got[bool(extra)] = cap(tokens, pixels=px, output="logprobs", kernel="torch")
        impls = {cap.model.config.encoder._attn_implementation, cap.model.config.decoder._attn_implementation}
        assert impls == ({"eager"} if extra else {"sdpa"})
    torch.testing.assert_close(got[True], got[False], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"^captioner.attn_implementation=sdpa: ValueError: "
                                          r"BlipForConditionalGeneration does not support an attention implementation"):
        build_captioner(hf_config(folders["blip"], "captioner.attn_implementation=sdpa"))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_head_equals_torch_path(folders, family):
    """GPT-2 with an untied head; BLIP's head has a bias (one more input column of the fused kernel)."""
    cap = captioner(folders, family, untie=True)  # eval mode: no dropout, gradients still flow
    tokens, vt = cap.tokenizer.batch(CAPTIONS, 40), cap.visual_tokens(pixels())
    out = {}
    for fused in (False, True):
        cap.zero_grad()
        lp = cap(tokens, visual_tokens=vt, output="logprobs", kernel="torch", fused=fused)
        lp.sum().backward()
        out[fused] = (lp.detach(), cap.head_weight.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_caption_holding_special_tokens_as_text_stays_text(folders, family):
    caption_with_specials_as_text(captioner(folders, family).tokenizer, caption_decodes=family == "vit-gpt2")


def test_the_tiny_builders_cli_refuses_bad_sizes_and_a_folder_that_holds_files(folders, tmp_path, capsys):
    """One usage line, exit 2; a folder holding a model (a real one, say) is never written over."""
    from dico_scale.models.tiny import main

    before = {p.name: p.stat().st_mtime_ns for p in Path(folders["vit-gpt2"]).iterdir()}
    cases = {("--width", "0"): "--width 0: sizes are whole numbers >= 1",
             ("--width", "30", "--heads", "4"): "--width 30 is not a multiple of --heads 4",
             ("--vocab-size", "-1"): "--vocab-size -1: sizes",
             ("--out",): f"{folders['vit-gpt2']} exists and is not an empty folder",
             ("--out-unwritable",): "/proc/none cannot be created: No such file or directory"}
    for args, needle in cases.items():
        out = {("--out",): folders["vit-gpt2"], ("--out-unwritable",): "/proc/none"}.get(args, str(tmp_path / "new"))
        with pytest.raises(SystemExit) as e:
            main(["vit-gpt2", out, *(a for a in args if not a.startswith("--out"))])
        assert e.value.code == 2 and needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert {p.name: p.stat().st_mtime_ns for p in Path(folders["vit-gpt2"]).iterdir()} == before
    assert not (tmp_path / "new").exists()


def test_freeze_parts_and_the_reference_without_tower(folders):
    cfg = hf_config(folders["vit-gpt2"], "captioner.freeze=vision,embeddings")
    cap = build_captioner(cfg).train()
    frozen = {n for n, p in cap.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.encoder.") for n in frozen) and "model.decoder.transformer.wpe.weight" in frozen
    assert all(not n.startswith("model.encoder.") for n, p in cap.named_parameters() if p.requires_grad)
    assert not cap.model.encoder.training and cap.decoder.training
    ref = build_captioner(cfg, image_encoder=False)
    assert not any(k.startswith(cap.tower_prefix) for k in ref.state_dict())
    assert all(k.startswith("model.") for k in cap.state_dict())  # each weight once, under transformers' own name
    with pytest.raises(ConfigError, match="captioner.freeze"):
        build_captioner(hf_config(folders["vit-gpt2"], "captioner.freeze=vision,decoder"))


def test_a_folder_of_no_tokenizer_or_bad_token_ids_or_a_part_it_lacks_is_one_line(folders, tmp_path):
    """A BLIP folder without its tokenizer files (AutoTokenizer would build one of the special tokens alone: every
    word [UNK]), an EOS beyond the vocabulary (an index error at the first step), freeze=projection on a model that has
    none, gradient checkpointing on BLIP's text decoder (transformers has none): each is a ConfigError naming it."""
    import shutil

    blip = shutil.copytree(folders["blip"], tmp_path / "blip")
    for f in blip.glob("tokenizer*"):
        f.unlink()
    (blip / "vocab.txt").unlink(missing_ok=True)
    with pytest.raises(ConfigError) as e:
        build_captioner(hf_config(str(blip)))
    assert str(e.value) == (f"captioner.hf_path '{blip}': its tokenizer does not load (none of tokenizer.json, "
                            "tokenizer_config.json, vocab.json, vocab.txt, tokenizer.model, spiece.model in it)")

    gpt = shutil.copytree(folders["vit-gpt2"], tmp_path / "vit-gpt2")
    config = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**config, "eos_token_id": 99999}))
    with pytest.raises(ConfigError) as e:
        build_captioner(hf_config(str(gpt)))
    vocab = config["decoder"]["vocab_size"]
    assert str(e.value) == (f"captioner.hf_path '{gpt}': its EOS token id 99999 is outside the model's vocabulary "
                            f"({vocab} tokens): check its config.json and generation_config.json")

    with pytest.raises(ConfigError, match=r"^captioner.freeze: 'projection' names nothing in this "
                                          r"VisionEncoderDecoderModel"):
        build_captioner(hf_config(folders["vit-gpt2"], "captioner.freeze=vision,projection"))
    with pytest.raises(ConfigError, match=r"^captioner.gradient_checkpointing: transformers has none for "
                                          r"BlipTextLMHeadModel"):
        build_captioner(hf_config(folders["blip"], "captioner.gradient_checkpointing=true"))


def test_gradient_checkpointing_covers_a_trainable_tower_with_the_same_gradients(folders):
    def grads(*extra):
        torch.manual_seed(0)
        cap = build_captioner(hf_config(folders["vit-gpt2"], "captioner.freeze=", *extra)).train()
        tokens = cap.tokenizer.batch(CAPTIONS, 12)
        logp = cap(tokens, pixels=pixels(len(CAPTIONS)), output="logprobs", kernel="torch")
        logp.sum().backward()
        return cap, logp.detach(), {n: p.grad for n, p in cap.named_parameters() if p.grad is not None}

    cap, plain, g = grads()
    ckpt, again, g2 = grads("captioner.gradient_checkpointing=true")
    assert not any(layer.gradient_checkpointing for layer in cap.model.encoder.layers)
    assert all(layer.gradient_checkpointing for layer in ckpt.model.encoder.layers)  # the trainable tower's
    assert ckpt.model.decoder.transformer.gradient_checkpointing
    assert any(n.startswith("model.encoder.") for n in g2) and g.keys() == g2.keys()
    torch.testing.assert_close(again, plain)
    for n in g:
        torch.testing.assert_close(g2[n], g[n], msg=n)


def test_save_pretrained_round_trip(folders, tmp_path):
    from transformers import VisionEncoderDecoderModel

    cap = captioner(folders, "vit-gpt2", untie=True)
    cap.save_pretrained(tmp_path / "hf", {k: v.detach() for k, v in cap.state_dict().items()})
    again = VisionEncoderDecoderModel.from_pretrained(tmp_path / "hf").eval()
    kw = dict(num_beams=3, max_new_tokens=8, length_penalty=0.0, do_sample=False)
    with torch.no_grad():
        assert torch.equal(again.generate(pixel_values=pixels(), **kw), cap.model.generate(pixel_values=pixels(), **kw))
    rebuilt = build_captioner(hf_config(str(tmp_path / "hf")))
    assert rebuilt.tokenizer.decode_batch(rebuilt.tokenizer.batch(CAPTIONS, 40)) == CAPTIONS


def test_a_folders_search_settings_ours_does_not_follow_are_named(folders, tmp_path):
    """A folder's generation_config.json asking generate for another search (num_beams, no_repeat_ngram_size, ...)
    is named in one note; a folder our export wrote with the run's search gives none."""
    import shutil

    from dico_scale.config import GenerationConfig
    from dico_scale.models.folders import generation_note

    g = GenerationConfig(candidates=5, max_len=20, length_penalty=1.0, early_stopping="false")
    folder = tmp_path / "theirs"
    shutil.copytree(folders["vit-gpt2"], folder)
    assert generation_note(str(folder), g) is None  # token ids only, as save_pretrained wrote it
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(num_beams=3, early_stopping=True, length_penalty=1, no_repeat_ngram_size=3, min_length=0,
                  repetition_penalty=1.2, do_sample=False, num_beam_groups=2)
    (folder / "generation_config.json").write_text(json.dumps(config))
    note = generation_note(str(folder), g)
    assert note.startswith(f"note: {folder}/generation_config.json sets num_beams=3 (ours: generation.candidates=5), "
                           "early_stopping=True (ours: generation.early_stopping=false), repetition_penalty=1.2 (ours: "
                           "generation.repetition_penalty=1.0), no_repeat_ngram_size=3 (ours: "
                           "generation.no_repeat_ngram_size=0), num_beam_groups=2 (not applied): ") and "\n" not in note
    (folder / "generation_config.json").write_text("{not json")
    assert generation_note(str(folder), g) is None  # transformers itself reports a broken file when it loads

    cap = captioner(folders, "vit-gpt2")
    cap.save_pretrained(tmp_path / "hf", {k: v.detach() for k, v in cap.state_dict().items()}, g)
    assert generation_note(str(tmp_path / "hf"), g) is None


@pytest.mark.parametrize("family, targets, inner, held, why", [
    ("vit-gpt2", "c_attn", "ln_f", "transformer", "holds the output head's weight"),  # GPT-2's tied embedding
    ("blip", "query", "transform.LayerNorm", "transform", "HFEncoderDecoder calls itself")])
def test_modules_to_save_on_the_encoder_decoder_row(folders, family, targets, inner, held, why):
    """captioner.lora.modules_to_save inside the decoder: peft's trained copy is what runs (it alone changes the
    log-probs; disabled, the plain captioner's), merged under plain keys. A module the row calls itself (its views of
    the decoder: BLIP's head transform) is refused: the view would go on running the starting copy."""
    from dico_scale.models.lora import adapters_disabled, merged_state

    cap = build_captioner(hf_config(folders[family], "captioner.lora.r=4", f"captioner.lora.target_modules={targets}",
                                    f"captioner.lora.modules_to_save={inner}")).eval()
    plain = build_captioner(hf_config(folders[family])).eval()
    tokens, px = cap.tokenizer.batch(CAPTIONS, 16), pixels()
    whole = [n for n, p in cap.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert whole and all(".modules_to_save.default." in n for n in whole)
    with torch.no_grad():  # adapters at zero (peft's start): the trained copy alone moves
        g = torch.Generator().manual_seed(2)
        for n, p in cap.named_parameters():
            if n in whole:
                p.add_(torch.randn(p.shape, generator=g))
        ours = cap(tokens, pixels=px, output="logprobs", kernel="torch")
        with adapters_disabled(cap):
            reference = cap(tokens, pixels=px, output="logprobs", kernel="torch")
        torch.testing.assert_close(reference, plain(tokens, pixels=px, output="logprobs", kernel="torch"), rtol=0,
                                   atol=1e-5)
        assert (ours - reference).abs().max() > 1e-3
        plain.load_state_dict(merged_state(cap, dict(cap.state_dict())), strict=True)
        torch.testing.assert_close(plain(tokens, pixels=px, output="logprobs", kernel="torch"), ours, rtol=0,
                                   atol=1e-4)
    with pytest.raises(ConfigError, match=rf"'captioner.lora.modules_to_save': {held} matches .*{held}, which {why}"):
        build_captioner(hf_config(folders[family], "captioner.lora.r=4", f"captioner.lora.target_modules={targets}",
                                  f"captioner.lora.modules_to_save={held}"))


@pytest.mark.parametrize("family,targets", [("vit-gpt2", "c_attn,c_proj"), ("blip", "query,value")])
def test_lora_on_the_encoder_decoder_row(folders, family, targets):
    """peft adapters on the decoder only (the tower frozen); disabled, the policy is the plain captioner; merged, the
    plain captioner's keys give the adapted log-probs."""
    from dico_scale.models.lora import adapters_disabled, merged_state

    cap = build_captioner(hf_config(folders[family], "captioner.lora.r=4", f"captioner.lora.target_modules={targets}"))
    plain = build_captioner(hf_config(folders[family])).eval()
    cap.eval()
    with torch.no_grad():  # adapters that change the outputs (peft starts lora_B at zero)
        for name, p in cap.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    trainable = [n for n, p in cap.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(n.startswith(cap.tower_prefix) for n in trainable)
    tokens, px = cap.tokenizer.batch(CAPTIONS, 16), pixels()

    def logprobs(model):
        with torch.no_grad():
            return model(tokens, pixels=px, output="logprobs", kernel="torch")
    with adapters_disabled(cap):
        torch.testing.assert_close(logprobs(cap), logprobs(plain), rtol=0, atol=1e-5)
    assert (logprobs(cap) - logprobs(plain)).abs().max() > 1e-3
    merged = merged_state(cap, {k: v.clone() for k, v in cap.state_dict().items()})
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logprobs(plain), logprobs(cap), rtol=0, atol=1e-4)
