"""The DiCO reference's architecture (models/dico_ref.py) against transformers' own modules: a folder written in the
reference's save_pretrained layout from small random CLIPVisionModel, BertModel and GPT2LMHeadModel loads, our
logits equal theirs, our beams equal generate on their modules, bad folders are named, and the converter's model.pt
loads back."""
import json

import pytest
import torch

from dico_scale.config import ConfigError, load_config
from dico_scale.convert import main as convert_main
from dico_scale.models import build_captioner
from dico_scale.models.generation import beam_search
from dico_scale.models.tiny import dico_ref

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
BOS, EOS, PAD = 49406, 49407, 49408


def cfg_for(path, *extra):
    return load_config("configs/demo/xe.yaml",
                       BLANK + ["captioner.model=dico_ref", f"captioner.hf_path={path}", *extra])


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dico_ref")
    parts = dico_ref(str(folder), width=32, layers=2, heads=2, image_size=32)
    for m in parts.values():
        m.eval()
    return folder, parts


def their_memory(parts, pixels):
    vision = parts["encoder.vision_encoder."](pixel_values=pixels).last_hidden_state
    embeds = parts["encoder.vis_enc_to_enc_proj."](vision)
    return parts["encoder.encoder."](inputs_embeds=embeds).last_hidden_state


def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_logits_equal_the_reference_modules(ref):
    folder, parts = ref
    ours = build_captioner(cfg_for(folder)).eval()
    tokens = ours.tokenizer.batch(["a red circle at the top", "two blue stars"], 24)
    with torch.no_grad():
        theirs = parts["decoder."](input_ids=tokens[:, :-1], encoder_hidden_states=their_memory(parts, pixels())).logits
        mine = ours(tokens, pixels=pixels(), output="logits")
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    assert not torch.equal(ours.head_weight, ours.decoder.transformer.wte.weight)  # untied, as its config says


def test_beams_equal_generate_on_the_reference_modules(ref):
    """The reference draws its candidates with generate's beam search (length_penalty 1.0 from its config): ours
    gives the same k, in the same order."""
    folder, parts = ref
    ours, k, max_len = build_captioner(cfg_for(folder)).eval(), 3, 6
    for lp in (1.0, 0.0):
        with torch.no_grad():
            mine, _ = beam_search(ours, ours.image_context(ours.visual_tokens(pixels())), k, max_len, BOS, EOS, PAD,
                                  lp)
            memory = their_memory(parts, pixels())
            start = torch.full((memory.size(0), 1), BOS)
            theirs = parts["decoder."].generate(input_ids=start, encoder_hidden_states=memory, num_beams=k,
                                                num_return_sequences=k, length_penalty=lp, max_new_tokens=max_len,
                                                do_sample=False, bad_words_ids=[[BOS], [PAD]], eos_token_id=EOS,
                                                pad_token_id=PAD)
        mine = mine.flatten(0, 1)
        assert ours.tokenizer.decode_batch(mine) == ours.tokenizer.decode_batch(theirs)
        n = min(mine.size(-1), theirs.size(-1))
        assert torch.equal(mine[:, :n], theirs[:, :n])


def test_tied_head_and_bad_folders(ref, tmp_path):
    folder, _ = ref
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    config = json.loads((folder / "config.json").read_text())

    def write(name, st, cf):
        d = tmp_path / name
        d.mkdir()
        torch.save(st, d / "pytorch_model.bin")
        (d / "config.json").write_text(json.dumps(cf))
        return d

    tied = {**config, "decoder": {**config["decoder"], "tie_word_embeddings": True}}
    m = build_captioner(cfg_for(write("tied", {k: v for k, v in state.items() if k != "decoder.lm_head.weight"}, tied)))
    assert m.head_weight is m.decoder.transformer.wte.weight
    bad = {k: v for k, v in state.items() if k != "encoder.encoder.encoder.layer.0.output.dense.bias"}
    bad["decoder.transformer.h.9.mlp.c_fc.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"missing encoder\.encoder\.layer\.0\.output\.dense\.bias.*extra "
                                          r"decoder\.transformer\.h\.9\.mlp\.c_fc\.weight"):
        build_captioner(cfg_for(write("bad", bad, config)))
    with pytest.raises(ConfigError, match="use captioner.model=dico_ref"):
        build_captioner(cfg_for(folder, "captioner.model=hf_encoder_decoder"))


def test_gradient_checkpointing_covers_encoder_and_trainable_tower_and_projection_must_exist(ref, tmp_path):
    folder, _ = ref
    m = build_captioner(cfg_for(folder, "captioner.gradient_checkpointing=true", "captioner.freeze="))
    for part in (m.decoder, m.encoder, m.vision):  # GPT-2, the BERT encoder, the CLIP tower (trainable here)
        flags = [x.gradient_checkpointing for x in part.modules() if hasattr(x, "gradient_checkpointing")]
        assert flags and all(flags), type(part).__name__
    frozen = build_captioner(cfg_for(folder, "captioner.gradient_checkpointing=true"))  # the tower frozen
    assert not any(getattr(x, "gradient_checkpointing", False) for x in frozen.vision.modules())
    assert not build_captioner(cfg_for(folder, "captioner.freeze=vision,projection")).proj.weight.requires_grad
    same = tmp_path / "same_width"  # a tower as wide as the encoder: fed without a projection, none to freeze
    same.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["encoder"]["vision_encoder"]["hidden_size"] = config["encoder"]["encoder"]["hidden_size"]
    (same / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^captioner.freeze: 'projection' names nothing in this reference"):
        build_captioner(cfg_for(same, "captioner.freeze=vision,projection"))


def test_converter_writes_a_model_pt_that_loads_back(ref, tmp_path, capsys):
    folder, _ = ref
    assert convert_main(["dico-ref", str(folder), "--out", str(tmp_path / "model.pt")]) == 0
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    again = build_captioner(cfg_for(folder), str(tmp_path / "model.pt"))
    assert all(torch.equal(v, blob["state_dict"][k]) for k, v in again.state_dict().items())
    (tmp_path / "empty").mkdir()
    assert convert_main(["dico-ref", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no config.json" in capsys.readouterr().err
    for out, needle in ((tmp_path, "is a folder; name the file to write"), ("/proc/none/x.pt", "cannot be written")):
        assert convert_main(["dico-ref", str(folder), "--out", str(out)]) == 2  # before converting anything
        assert capsys.readouterr().err == f"dico_scale.convert: error: --out '{out}' {needle}" + (
            "\n" if out == tmp_path else " (No such file or directory)\n")


def _vision(**kw):
    return lambda c: c["encoder"]["vision_encoder"].update(kw)


def _decoder(**kw):
    return lambda c: c["decoder"].update(kw)


# config.json edits of a hostile user -> the one line's needle (transformers raised AttributeError, TypeError,
# ValueError or RuntimeError for each, or built a giant model before comparing it with the weights)
HOSTILE = {
    "encoder a string": (lambda c: c.update(encoder="oops"), "config.json's encoder is \"oops\", not a JSON object"),
    "encoder a list": (lambda c: c.update(encoder=[1]), "config.json's encoder is [1], not a JSON object"),
    "decoder a string": (lambda c: c.update(decoder="gpt2"), "config.json's decoder is \"gpt2\", not a JSON object"),
    "heads not dividing": (_vision(num_attention_heads=7),
                           "encoder.vision_encoder.hidden_size 64 is not a multiple of its num_attention_heads 7"),
    "negative width": (_vision(hidden_size=-4), "encoder.vision_encoder.hidden_size is -4, not a positive integer"),
    "a string size": (_decoder(vocab_size="49409"), "decoder.vocab_size is \"49409\", not a positive integer"),
    "zero width": (_decoder(n_embd=0), "decoder.n_embd is 0, not a positive integer"),
    "a string flag": (_decoder(tie_word_embeddings="no"), "config.json's decoder is not a valid GPT2Config"),
    "a million layers": (_decoder(n_layer=1_000_000), "decoder.n_layer is 1000000 but its weights hold 2 layers"),
    "a giant width": (_vision(hidden_size=2 ** 30), "weights do not fit its config.json: shapes vision."),
}


def hostile_copy(folder, tmp_path, edit=lambda c: None, state=None):
    d = tmp_path / "hostile"
    d.mkdir()
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    torch.save(state if state is not None else torch.load(folder / "pytorch_model.bin", weights_only=True),
               d / "pytorch_model.bin")
    return d


def assert_one_line_everywhere(d, tmp_path, capsys, needle, preflight=True):
    """The trainer's build (and its preflight) and the converter each give one line naming the folder."""
    from dico_scale.models.dico_ref import check_folder_weights

    for check in (lambda: build_captioner(cfg_for(d)),) + ((lambda: check_folder_weights(str(d))),) * preflight:
        with pytest.raises(ConfigError) as e:
            check()
        assert needle in str(e.value) and str(d) in str(e.value) and "\n" not in str(e.value)
    assert convert_main(["dico-ref", str(d), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dico_scale.convert: error: ") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_config_json_is_one_line(ref, tmp_path, capsys, case):
    edit, needle = HOSTILE[case]
    assert_one_line_everywhere(hostile_copy(ref[0], tmp_path, edit), tmp_path, capsys, needle)


@pytest.mark.parametrize("case", ["nan", "int64"])
def test_weights_that_are_not_finite_floats_are_refused(ref, tmp_path, capsys, case):
    folder, _ = ref
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    bad = {k: torch.full_like(v, float("nan")) if case == "nan" else v.long() for k, v in state.items()}
    needle = "vision.embeddings.class_embedding " + ("holds nan or inf values" if case == "nan" else "torch.int64")
    # the preflight reads no values (memory-mapped): nan is the build's to find
    assert_one_line_everywhere(hostile_copy(folder, tmp_path, state=bad), tmp_path, capsys, needle, case != "nan")
