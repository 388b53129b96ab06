"""The vision-language row (models/hf_vlm.py) against transformers itself, on the tiny random folders of every family
dico_scale.models.tiny writes (Idefics3 tiles, Qwen2-VL / Qwen3-VL patch grids and multimodal rotary positions,
Qwen3-VL's deepstack, LLaVA's and Gemma 3's one image size, Gemma 3's bidirectional image attention, sliding windows
and tied head): every beam of our search equals `generate`'s, teacher-forced log-probs equal log_softmax of the
model's own logits over the continuation only (the prompt and the image never scored), and in a batch of images of
different sizes (tile counts, patch grids) each image's candidates and log-probs equal those of the image alone."""
import os

import pytest
import torch
from helpers import caption_with_specials_as_text
from PIL import Image

from dico_scale.config import ConfigError, load_config
from dico_scale.models import build_captioner
from dico_scale.models.captioner import scored_mask
from dico_scale.models.generation import beam_search, search_options
from dico_scale.models.tiny_vlm import VLM_FAMILIES, prompt_overrides

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
CAPTIONS = ["a red circle at the top", "two shapes: a blue star and a small green square", "a square"]
SIZES = [(64, 64), (64, 20), (30, 48)]  # (width, height): 5, 3 and 5 Idefics3 tiles; 3 different Qwen2-VL grids


# Gemma 3 with its processor's pan-and-scan crops (captioner.images_kwargs): an elongated image gets more runs of
# image tokens, so a batch holds prompts of different lengths and its token types are left-padded with them
PAN_AND_SCAN = ["captioner.images_kwargs.do_pan_and_scan=true", "captioner.images_kwargs.pan_and_scan_min_crop_size=8",
                "captioner.images_kwargs.pan_and_scan_min_ratio_to_activate=1.2"]
VARIANTS = {"gemma3:pan-and-scan": ("gemma3", PAN_AND_SCAN)}


def captioner(folder: str, *extra: str):
    prompt = prompt_overrides(os.path.basename(folder))  # conftest's vlm_folders: a folder per family, named by it
    cfg = load_config("configs/demo/xe.yaml", BLANK + ["captioner.model=hf_vlm", f"captioner.hf_path={folder}",
                                                       *prompt, *extra])
    return build_captioner(cfg).eval()


def images():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in SIZES]


def batch(cap, ims):
    return cap.preprocess.collate([cap.preprocess(im) for im in ims])


@pytest.fixture(scope="module", params=VLM_FAMILIES + tuple(VARIANTS))
def cap(request, vlm_folders):
    family, extra = VARIANTS.get(request.param, (request.param, []))
    return captioner(vlm_folders[family], *extra)


def test_the_prompt_row_is_the_one_the_processors_chat_path_builds(cap):
    """One image's prompt row (image tokens, chat template, BOS) equals apply_chat_template(tokenize=True) with the
    image: Gemma 3's template writes <bos> and its tokenizer adds one too, which must not give two."""
    from dico_scale.models.vlm_processor import user_turn

    for im in images()[:2]:
        turn = user_turn("Describe this image in one sentence.")
        turn["content"][0]["image"] = im
        if cap.processor.chat_template:
            theirs = cap.processor.apply_chat_template([turn], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt",
                                                       images_kwargs=dict(cap.preprocess.images_kwargs))
        else:  # PaliGemma: the prompt as written, completed by the processor ("<image>...<bos>caption en\n")
            theirs = cap.processor(images=[im], text=[cap.preprocess.text], return_tensors="pt")
            assert cap.processor.tokenizer.decode(theirs["input_ids"][0, -1]) == "\n"
        ours = batch(cap, [im])
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        for key in set(theirs) & set(ours.tensors) - {"input_ids"}:
            assert torch.equal(ours[key], theirs[key]), key


def beams_equal_generate(cap, im, k, max_len, lp, early_stopping=False, **options):
    """Our k beams for one image equal generate's, in its order; returns ours (tokens [k, 1 + n], sums [k]).
    options: repetition_penalty, no_repeat_ngram_size."""
    tok, one = cap.tokenizer, batch(cap, [im])
    with torch.no_grad():
        ours, sums = beam_search(cap, cap.image_context(one), k, max_len, tok.bos, tok.eos, tok.pad, lp,
                                 early_stopping, **options)
        theirs = cap.model.generate(**one.tensors, num_beams=k, num_return_sequences=k, length_penalty=lp,
                                    early_stopping=early_stopping, max_new_tokens=max_len, do_sample=False,
                                    eos_token_id=tok.eos, pad_token_id=tok.pad,
                                    bad_words_ids=[[tok.pad]], **options)  # ours never proposes PAD
    theirs = theirs[:, one["input_ids"].size(1):]  # the continuation after the prompt
    for a, b in zip(ours[0], theirs):
        n = int(scored_mask(b[None], tok.eos).sum())
        assert a[1:n + 1].tolist() == b[:n].tolist() and bool((a[n + 1:] == tok.pad).all()), (lp, early_stopping)
    return ours[0], sums[0]


def test_beams_equal_transformers_generate(cap):
    """All k candidates, in generate's order, at the reference's length penalty (1.0) and at summed log-probs (0.0);
    the random models end some beams early, which generate sets aside while k keep running."""
    tok, k, max_len = cap.tokenizer, 3, 8
    for lp in (1.0, 0.0):
        for im in images():
            ours, sums = beams_equal_generate(cap, im, k, max_len, lp)
            assert any(len(c) > 0 for c in tok.decode_batch(ours))
            lens = scored_mask(ours[:, 1:], tok.eos).sum(-1)
            assert (sums / lens ** lp).diff().le(1e-6).all()  # best first


@pytest.mark.parametrize("family", ["idefics3", "qwen2-vl"])
def test_every_early_stopping_mode_equals_generate(vlm_folders, family):
    """generate's early_stopping False (its heuristic), True (stop once k are set aside) and "never" (a running beam
    scored at max_length): the same k candidates as generate. EOS made likelier, so that beams end at mixed lengths
    and the three modes do choose differently here."""
    cap = captioner(vlm_folders[family])
    tok, k, max_len = cap.tokenizer, 3, 8
    with torch.no_grad():
        cap.model.get_output_embeddings().weight[tok.eos] *= 3
    got = {(lp, stop): [tok.decode_batch(beams_equal_generate(cap, im, k, max_len, lp, stop)[0]) for im in images()]
           for lp in (1.0, 2.0) for stop in (False, True, "never")}
    assert got[1.0, False] != got[1.0, "never"] and got[2.0, False] != got[2.0, True]


@pytest.mark.parametrize("family", ["idefics3", "qwen2-vl", "paligemma"])
def test_repetition_penalty_and_ngram_ban_equal_generate(vlm_folders, family):
    """generate's repetition_penalty and no_repeat_ngram_size count the prompt (chat template, image tokens) and the
    caption so far, on beam search's log-probs and greedy search's logits: the same candidates as generate. The
    tiny random models repeat themselves, so each option does change the captions here."""
    cap = captioner(vlm_folders[family])
    tok, ims = cap.tokenizer, images()[:2]
    for k in (3, 1):
        plain = [tok.decode_batch(beams_equal_generate(cap, im, k, 8, 1.0)[0]) for im in ims]
        for options in ({"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 1},
                        {"repetition_penalty": 0.7, "no_repeat_ngram_size": 2}):
            got = [tok.decode_batch(beams_equal_generate(cap, im, k, 8, 1.0, **options)[0]) for im in ims]
            assert got != plain, (k, options)


def test_the_prompts_padding_is_not_a_token_the_options_count(vlm_folders):
    """In a batch of prompts of different lengths (left-padded), each image's candidates under a repetition
    penalty and an n-gram ban equal those of the image alone: padding is neither repeated nor part of an n-gram.
    Padded with EOS, as a tokenizer without a pad token is: counted, it would penalise ending in padded rows."""
    cap = captioner(vlm_folders["llava-next"])  # a prompt without EOS (Idefics3's, Qwen's end their user turn with it)
    cap.tokenizer.pad = cap.preprocess.pad_id = cap.tokenizer.eos
    with torch.no_grad():
        cap.model.get_output_embeddings().weight[cap.tokenizer.eos] *= 5  # candidates that do end
    tok, ims, options = cap.tokenizer, images(), {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    mixed = batch(cap, ims)
    assert bool((mixed["attention_mask"] == 0).any())
    assert cap.banned_tokens(tok.bos, tok.eos, tok.pad) == []  # EOS is proposed: its padding must not count
    with torch.no_grad():
        cands, _ = beam_search(cap, cap.image_context(mixed), 3, 8, tok.bos, tok.eos, tok.pad, **options)
        for i, im in enumerate(ims):
            alone, _ = beam_search(cap, cap.image_context(batch(cap, [im])), 3, 8, tok.bos, tok.eos, tok.pad,
                                   **options)
            n = alone.size(-1)
            assert torch.equal(cands[i, :, :n], alone[0]) and bool((cands[i, :, n:] == tok.pad).all())


@pytest.mark.parametrize("family", ["gemma3", "qwen2-vl"])
def test_the_exported_folder_generates_our_captions_by_default(vlm_folders, family, tmp_path):
    """The export's transformers folder holds the run's search as its generation config: generate(**inputs), no
    search arguments, gives our best beam (Gemma 3's config lists two end tokens; ours stops at the turn's end)."""
    import transformers

    from dico_scale.config import GenerationConfig

    cap = captioner(vlm_folders[family])
    tok, g = cap.tokenizer, GenerationConfig(candidates=3, max_len=8, length_penalty=2.0, early_stopping="never",
                                             repetition_penalty=1.3, no_repeat_ngram_size=3)
    ends = cap.model.generation_config.eos_token_id
    others = [e for e in (ends if isinstance(ends, list) else [ends]) if e != tok.eos]  # Gemma 3: <eos>
    with torch.no_grad():
        head = cap.model.get_output_embeddings().weight
        head[tok.eos] *= 3  # beams of mixed lengths
        head[others] *= 5  # and the folder's other end token in ours: the export's generate must not stop there
    cap.save_pretrained(tmp_path / "hf", cap.state_dict(), g)
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    search = model.generation_config
    assert (search.num_beams, search.early_stopping, search.repetition_penalty, search.no_repeat_ngram_size) == (
        3, "never", 1.3, 3)
    for im in images():
        one = batch(cap, [im])
        with torch.no_grad():
            ours, _ = beam_search(cap, cap.image_context(one), 3, 8, tok.bos, tok.eos, tok.pad, **search_options(g))
            theirs = model.generate(**one.tensors)[0, one["input_ids"].size(1):]
        n = int(scored_mask(theirs[None], tok.eos).sum())
        assert ours[0, 0, 1:n + 1].tolist() == theirs[:n].tolist() and bool((ours[0, 0, n + 1:] == tok.pad).all())


def test_teacher_forced_logprobs_cover_the_continuation_only(cap):
    tok, ims = cap.tokenizer, images()
    tokens = tok.batch(CAPTIONS, 40)
    with torch.no_grad():
        ours = cap(tokens, pixels=batch(cap, ims), output="logprobs", kernel="torch")
        for i, im in enumerate(ims):  # the model's own forward over prompt + caption, alone
            one = batch(cap, [im])
            caption = tokens[i:i + 1, 1:]
            ids = torch.cat([one["input_ids"], caption], 1)
            extra = {k: v for k, v in one.tensors.items() if k not in ("input_ids", "attention_mask")}
            for key in ("mm_token_type_ids", "token_type_ids"):  # the caption's tokens are text (0), or
                if key in extra:  # PaliGemma's suffix (1), attending causally after its prefix
                    kind = torch.full_like(caption, int(cap.prefix_lm and key == "token_type_ids"))
                    extra[key] = torch.cat([extra[key], kind], 1)
            logits = cap.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
            prompt = one["input_ids"].size(1)
            logp = torch.log_softmax(logits[0, prompt - 1:-1].double(), -1)  # predicting w1 ... after the prompt
            want = (logp.gather(-1, caption[0, :, None])[:, 0] * scored_mask(caption, tok.eos)[0]).sum()
            torch.testing.assert_close(ours[i].double(), want, rtol=0, atol=1e-4)
    assert tok.decode_batch(tokens) == CAPTIONS


def test_a_mixed_batch_equals_each_image_alone(cap):
    tok, ims, k = cap.tokenizer, images(), 3
    mixed = batch(cap, ims)
    lengths = {batch(cap, [im])["input_ids"].size(1) for im in ims}
    one_size = ("llava", "gemma3", "paligemma")  # every image one run of image tokens
    if cap.model.config.model_type not in one_size or cap.preprocess.images_kwargs:
        assert len(lengths) >= 2, "the images should need different numbers of image tokens"
    with torch.no_grad():
        cands, _ = beam_search(cap, cap.image_context(mixed), k, 8, tok.bos, tok.eos, tok.pad)
        logps = cap(cands.flatten(0, 1), visual_tokens=mixed, repeats=k, output="logprobs").view(len(ims), k)
        for i, im in enumerate(ims):
            one = batch(cap, [im])
            alone, _ = beam_search(cap, cap.image_context(one), k, 8, tok.bos, tok.eos, tok.pad)
            n = alone.size(-1)
            assert torch.equal(cands[i, :, :n], alone[0]) and bool((cands[i, :, n:] == tok.pad).all())
            lp = cap(alone[0], visual_tokens=one, repeats=k, output="logprobs")
            torch.testing.assert_close(logps[i], lp, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["idefics3", "gemma3", "paligemma"])
def test_eager_attention_gives_the_same_candidates_and_logprobs(vlm_folders, family):
    """captioner.attn_implementation reaches every sub-model (text and vision), and the prompt's prefill, the expanded
    cache, the left padding of a mixed batch and teacher forcing give the same candidates and log-probs under eager
    attention as under transformers' default (sdpa): Idefics3's tiles; Gemma 3's bidirectional image attention, a
    mask of its own. (flex_attention compiles through inductor, ~50 s for a tiny model's forward on this CPU, and
    has no backward on a CPU: preflight refuses it for training there.)"""
    base = captioner(vlm_folders[family])
    tok, mixed, k = base.tokenizer, batch(base, images()), 3
    assert base.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        want, want_sums = beam_search(base, base.image_context(mixed), k, 8, tok.bos, tok.eos, tok.pad)
        want_lp = base(want.flatten(0, 1), visual_tokens=mixed, repeats=k, output="logprobs")
    cap = captioner(vlm_folders[family], "captioner.attn_implementation=eager")
    configs = [cap.model.config] + [getattr(cap.model.config, key) for key in cap.model.config.sub_configs]
    assert {c._attn_implementation for c in configs if c is not None} == {"eager"}
    with torch.no_grad():
        got, sums = beam_search(cap, cap.image_context(mixed), k, 8, tok.bos, tok.eos, tok.pad)
        lp = cap(want.flatten(0, 1), visual_tokens=mixed, repeats=k, output="logprobs")
    assert torch.equal(got, want)
    torch.testing.assert_close(sums, want_sums, rtol=0, atol=1e-4)
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-4)


def test_gradients_reach_the_prompt_through_its_cache(cap):
    """The policy's log-probs depend on the prompt's states: the text model's embeddings of the prompt tokens get a
    gradient from a loss on the continuation alone."""
    cap.train()
    try:
        tokens = cap.tokenizer.batch(CAPTIONS[:2], 40)
        one = batch(cap, images()[:2])
        emb = cap.model.get_input_embeddings().weight
        emb.grad = None
        cap(tokens, pixels=one, output="logprobs", kernel="torch").sum().backward()
        prompt_only = sorted(set(one["input_ids"][0, :-1].tolist()) - set(tokens.flatten().tolist()))
        assert prompt_only and emb.grad[prompt_only].abs().sum() > 0
    finally:
        cap.eval()
        cap.zero_grad(set_to_none=True)


# tiles + 1-d positions; patches + multimodal rotary; bidirectional image attention + sliding windows; anyres tiles
# (configs/llava_next turns it on)
@pytest.mark.parametrize("family", ["idefics3", "qwen2-vl", "gemma3", "llava-next", "paligemma"])
def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients_and_keeps_less(vlm_folders, family):
    """captioner.gradient_checkpointing recomputes the text layers in backward (their cache writes replayed): the same
    log-probs and gradients, prompt included, and a fraction of the activations kept for backward."""
    cap, ckpt = captioner(vlm_folders[family]), captioner(vlm_folders[family], "captioner.gradient_checkpointing=true")
    ckpt.load_state_dict(cap.state_dict())
    tokens = cap.tokenizer.batch(CAPTIONS[:2] * 2, 40)
    two = batch(cap, images()[:2])
    results = []
    for model in (cap, ckpt):
        model.train()
        kept = []
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
                out = model(tokens, pixels=two, repeats=2, output="logprobs", kernel="torch")
            out.sum().backward()
            results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}, sum(kept)))
        finally:
            model.eval()
            model.zero_grad(set_to_none=True)
    (out, grads, kept), (out_c, grads_c, kept_c) = results
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-5)
    assert grads.keys() == grads_c.keys() and any("embed" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert kept_c < kept / 2


def test_xe_targets_are_the_answer_the_chat_template_renders(cap):
    """BOS, the caption and EOS are the tokens of the assistant's answer in the folder's own chat template, leading
    space included (Idefics3, LLaVA: "Assistant: a red ..."; Qwen2-VL: none), and decode back to the caption. EOS is
    the end of turn the template writes, of those the generation config lists (Gemma 3: <end_of_turn>, not <eos>)."""
    caption = CAPTIONS[1]
    row = cap.tokenizer.batch([caption], 40)[0]
    row = row[:int(scored_mask(row[None, 1:], cap.tokenizer.eos).sum()) + 1].tolist()  # BOS .. EOS
    assert cap.tokenizer.decode(row) == caption
    if not cap.processor.chat_template:  # PaliGemma: the suffix its processor appends to the prompt for training
        theirs = cap.processor(images=images()[:1], text=[cap.text], suffix=[caption])
        suffix = [t for t, kind in zip(theirs["input_ids"][0], theirs["token_type_ids"][0]) if kind == 1]
        assert row == [cap.tokenizer.bos, *suffix]
        return
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in one sentence."}]},
                {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
    full = cap.processor.tokenizer(cap.processor.apply_chat_template(messages), add_special_tokens=False)["input_ids"]
    prompt = cap.processor.tokenizer(cap.text, add_special_tokens=False)["input_ids"]
    assert full[:len(prompt)] == prompt and row == full[len(prompt) - 1:len(prompt) - 1 + len(row)]


def test_a_caption_holding_special_tokens_as_text_stays_text(cap):
    caption_with_specials_as_text(cap.tokenizer)


def test_the_exported_folder_reads_back_as_the_same_captioner(cap, tmp_path):
    """save_pretrained (exports' hf/) writes weights and processor that load back to the same prompt rows and
    log-probs (Gemma 3's head tied to its embeddings, Qwen3-VL's deepstack tower)."""
    cap.save_pretrained(tmp_path / "hf", cap.state_dict())
    carried = [f"captioner.images_kwargs.{k}={v}" for k, v in cap.preprocess.images_kwargs.items()]
    if not cap.processor.chat_template:  # the run config carries them, and a template-less prompt as written
        carried.append(f"captioner.prompt={cap.text}")
    again = captioner(str(tmp_path / "hf"), *carried)
    ims, tokens = images(), cap.tokenizer.batch(CAPTIONS, 40)
    assert batch(again, ims)["input_ids"].tolist() == batch(cap, ims)["input_ids"].tolist()
    assert (again.tokenizer.bos, again.tokenizer.eos, again.tokenizer.pad) == (cap.tokenizer.bos, cap.tokenizer.eos,
                                                                                cap.tokenizer.pad)
    with torch.no_grad():
        want = cap(tokens, pixels=batch(cap, ims), output="logprobs", kernel="torch")
        got = again(tokens, pixels=batch(again, ims), output="logprobs", kernel="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_an_export_whose_starting_folder_is_gone_reads_its_own(vlm_folders, tmp_path, capsys):
    """caption / evaluate on a model.pt whose run started from a folder since moved: the export's own hf/ (same
    architecture and processor) stands in, with a note; the weights are the export's."""
    import shutil

    from dico_scale.config import to_yaml
    from dico_scale.export import checkpoint_meta, load_captioner, load_run_config

    start = tmp_path / "start"
    shutil.copytree(vlm_folders["gemma3"], start)
    cfg = load_config("configs/demo/xe.yaml", BLANK + ["captioner.model=hf_vlm", f"captioner.hf_path={start}"])
    cap = build_captioner(cfg).eval()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": cap.state_dict(), "config": to_yaml(cfg), "stage": "xe", "step": 3}, run / "model.pt")
    cap.save_pretrained(run / "hf", cap.state_dict())
    shutil.rmtree(start)
    meta = checkpoint_meta(str(run / "model.pt"))
    again, _ = load_captioner(load_run_config(meta, ["evaluator.weights="]), meta, "cpu")
    assert f"captioner.hf_path '{start}' is gone: using the export's own folder {run / 'hf'}" in capsys.readouterr().err
    tokens = cap.tokenizer.batch(CAPTIONS, 40)
    with torch.no_grad():
        want = cap(tokens, pixels=batch(cap, images()), output="logprobs", kernel="torch")
        got = again(tokens, pixels=batch(again, images()), output="logprobs", kernel="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    shutil.rmtree(run / "hf")  # neither folder: the one-line error names the missing one
    with pytest.raises(ConfigError, match=f"'{start}' is not a transformers checkpoint folder"):
        load_run_config(checkpoint_meta(str(run / "model.pt")), ["evaluator.weights="])


def test_the_demos_smolvlm_is_a_smolvlm2_folder(tmp_path):
    import json

    from dico_scale.demo import captioner_overrides

    overrides = captioner_overrides("smolvlm", str(tmp_path), width=32, layers=1, heads=2, image_size=32)
    folder = overrides[1].split("=", 1)[1]
    assert overrides[0] == "captioner.model=hf_vlm"
    assert json.loads((tmp_path / "smolvlm" / "config.json").read_text())["architectures"] == [
        "SmolVLMForConditionalGeneration"] and folder == str(tmp_path / "smolvlm")


def test_a_bad_eos_or_a_missing_weight_is_one_line(vlm_folders, tmp_path):
    """generation_config.json's eos_token_id beyond the vocabulary failed the first step with an IndexError (caption
    wrote max_len tokens); the image placeholder as EOS ended no caption; a weight missing from the files was drawn
    at random."""
    import json
    import shutil

    folder = shutil.copytree(vlm_folders["idefics3"], tmp_path / "idefics3")
    config = json.loads((folder / "config.json").read_text())
    vocab = config["text_config"]["vocab_size"]
    gen = json.loads((folder / "generation_config.json").read_text())
    for eos, why in ((99999, f"is outside the model's vocabulary ({vocab} tokens)"),
                     (config["image_token_id"], "is the image placeholder token")):
        (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
        with pytest.raises(ConfigError) as e:
            captioner(str(folder))
        assert str(e.value) == (f"captioner.hf_path '{folder}': its EOS token id {eos} {why}: check its config.json "
                                "and generation_config.json")

    # a weight the files lack: transformers would draw it at random and training go on
    from safetensors.torch import load_file, save_file

    (folder / "generation_config.json").write_text(json.dumps(gen))
    weights = load_file(folder / "model.safetensors")
    name = sorted(k for k in weights if "post_layernorm" in k)[0]
    save_file({k: v for k, v in weights.items() if k != name}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        captioner(str(folder))
    assert str(e.value).startswith(f"captioner.hf_path '{folder}': its weights lack 1 of the model's (transformers "
                                   "would draw them at random): "), str(e.value)
