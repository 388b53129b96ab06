"""Config schema, YAML `extends:`, dotlist overrides, one-line ConfigErrors, the CLI's early exit, engine helpers."""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dico_scale.config import Config, ConfigError, flatten, load_config, to_yaml

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo"
# The demo stages read weight files written by earlier stages (runs/demo/...): blank them so a fresh checkout loads.
BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


def _one_line_error(path, overrides, *needles) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(str(path) if path else None, overrides)
    msg = str(ei.value)
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ---- loading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,stage", [("evaluator", "evaluator"), ("xe", "xe"), ("dico", "dico"), ("scst", "scst")])
def test_demo_configs_load(name, stage):
    cfg = load_config(str(DEMO / f"{name}.yaml"), BLANK)
    assert isinstance(cfg, Config)
    assert cfg.train.stage == stage
    assert cfg.train.output_dir == f"runs/demo/{stage}"
    # from base.yaml (the parent), not overridden by the child
    assert cfg.captioner.image_encoder == "dico-tiny"
    assert cfg.evaluator.metric == "clips"
    assert cfg.data.synthetic.enabled is True
    assert cfg.generation.max_len == 16
    # resolved against the repository
    assert Path(cfg.train.deepspeed_config).is_file()
    assert Path(cfg.clip_model_configs, "dico-tiny.json").is_file()


def test_stage_table_is_what_config_export_and_the_demo_read():
    """config.py (through checks.py) imports the table without torch (a fresh interpreter), every row's class exists, the demo's chain
    and the captioner stages (what evaluate, caption and export accept) come from it."""
    import importlib

    from dico_scale.stages import STAGES, captioner_stages, chain

    code = "import sys, dico_scale.config, dico_scale.checks as c; print(sorted(c.STAGES), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout.split("\n")[0]
    assert out == "['dico', 'evaluator', 'scst', 'xe'] False"
    for spec in STAGES.values():
        module, cls = spec.cls.split(":")
        assert getattr(importlib.import_module(module), cls).name == spec.name
        assert spec.section is None or hasattr(Config(), spec.section)
    assert chain("dico") == ["evaluator", "xe", "dico"] and chain("scst") == ["evaluator", "xe", "scst"]
    assert captioner_stages() == ("xe", "dico", "scst")
    with pytest.raises(ConfigError, match="'bogus' is not one of evaluator, xe, dico, scst"):
        load_config(str(DEMO / "xe.yaml"), BLANK + ["train.stage=bogus"])


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "coco").glob("*.yaml")), ids=lambda p: p.name)
def test_coco_configs_load(path):
    cfg = load_config(str(path), BLANK)
    assert cfg.train.stage == (path.stem if path.stem in ("evaluator", "xe", "dico") else "xe")
    assert cfg.data.train_shards.startswith(cfg.data.root + "/")  # ${data.root} interpolated
    over = load_config(str(path), BLANK + ["data.root=/elsewhere"])
    assert over.data.train_shards.startswith("/elsewhere/")
    # an override's own ${...} reads the merged config (it failed as 'key not found', reading the override alone)
    over = load_config(str(path), BLANK + ["data.root=/x", "data.val_shards=${data.root}/v.tar"])
    assert over.data.val_shards == "/x/v.tar"


def test_extends_child_over_base_and_overrides_win():
    base = load_config(str(DEMO / "base.yaml"), BLANK)
    xe = load_config(str(DEMO / "xe.yaml"), BLANK)
    # base.yaml sets micro_batch_size 16, xe.yaml 32; base values not in xe.yaml survive
    from omegaconf import OmegaConf
    child = OmegaConf.load(DEMO / "xe.yaml").train.micro_batch_size
    assert base.train.micro_batch_size == 16 and xe.train.micro_batch_size == child != 16
    assert xe.optim.min_lr_ratio == pytest.approx(0.1) and xe.optim.schedule == "cosine"
    assert xe.captioner.width == base.captioner.width == 128
    assert xe.tracking.experiment == "dico-demo"
    over = load_config(str(DEMO / "xe.yaml"), BLANK + ["train.micro_batch_size=3", "captioner.width=64",
                                                       "optim.lr=1e-6", "optim.schedule=constant"])
    assert over.train.micro_batch_size == 3 and over.captioner.width == 64 and over.optim.schedule == "constant"
    assert isinstance(over.optim.lr, float) and over.optim.lr == pytest.approx(1e-6)
    assert isinstance(over.train.micro_batch_size, int)
    # a later override wins over an earlier one
    last = load_config(str(DEMO / "xe.yaml"), BLANK + ["train.max_steps=7", "train.max_steps=9"])
    assert last.train.max_steps == 9


def test_extends_is_relative_to_the_file_and_chains(tmp_path):
    mid = tmp_path / "a" / "mid.yaml"
    mid.parent.mkdir()
    mid.write_text(f"extends: {DEMO / 'xe.yaml'}\noptim:\n  lr: 0.5\n")
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text("extends: a/mid.yaml\ntrain:\n  max_steps: 3\n")
    cfg = load_config(str(leaf), BLANK)
    assert (cfg.train.stage, cfg.train.max_steps, cfg.optim.lr, cfg.optim.warmup_steps) == ("xe", 3, 0.5, 20)


def test_empty_override_blanks_a_string():
    cfg = load_config(str(DEMO / "dico.yaml"),
                      ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="])
    assert cfg.evaluator.weights == "" and cfg.train.init_from == "" and cfg.captioner.image_encoder_weights == ""
    quoted = load_config(str(DEMO / "dico.yaml"),
                         ["evaluator.weights=''", "captioner.image_encoder_weights=''", "train.init_from=''"])
    assert quoted == cfg


# ---- errors: one line, naming the key ---------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("optim.lrr=1", "optim.lrr"),
    ("captioner.nope.deeper=1", "captioner.nope"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("captioner.dropout=abc", "captioner.dropout"),
    ("train.stage=foo", "train.stage"),
    ("loss.kernel=cuda", "loss.kernel"),
    ("train.init_from=/nope", "train.init_from"),
    ("evaluator.weights=/nope/model.pt", "evaluator.weights"),
    ("train.resume=/nope", "train.resume"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("tracking.experiment=", "tracking.experiment"),
    ("tracking.finish_wait_s=-1", "tracking.finish_wait_s"),
    # the bounds the synthetic generator and torch's seeding hold to: refused here, not as a traceback in the ranks
    ("data.synthetic.image_size=16", "data.synthetic.image_size"),
    ("data.synthetic.image_size=2000", "data.synthetic.image_size"),
    ("data.synthetic.n_train=10000000000", "data.synthetic.n_train"),
    ("data.synthetic.seed=99999999999999999999999", "data.synthetic.seed"),
    ("train.seed=18446744073709551616", "train.seed"),
    ("train.preempt_signal=SIGKILL", "train.preempt_signal"),
    ("train.preempt_signal=SIGCHLD", "train.preempt_signal"),
    # the synthetic set would replace the shards: a spec given beside it would be ignored
    ("data.train_shards=/data/train-{0..3}.tar", "data.train_shards"),
    ("data.test_shards=/data/test.tar", "data.test_shards"),
])
def test_bad_override_is_one_line_naming_the_key(override, key):
    _one_line_error(DEMO / "dico.yaml", BLANK + [override], f"'{key}'")


def test_dico_stage_needs_two_beams():
    _one_line_error(DEMO / "dico.yaml", BLANK + ["generation.candidates=1"], "'generation.candidates'")
    assert load_config(str(DEMO / "xe.yaml"), BLANK + ["generation.candidates=1"]).generation.candidates == 1


def test_max_caption_tokens_must_hold_bos_and_eos():
    from dico_scale.data.tokenizer import CaptionTokenizer

    assert len(CaptionTokenizer().encode("a red circle", 2)) == 2  # 2 is the least that works
    _one_line_error(DEMO / "xe.yaml", BLANK + ["data.max_caption_tokens=1"], "'data.max_caption_tokens'")


def test_override_without_equals():
    _one_line_error(DEMO / "dico.yaml", BLANK + ["optim.lr"], "optim.lr", "key=value")
    _one_line_error(DEMO / "dico.yaml", BLANK + ["=3"], "'=3'", "key=value")


@pytest.mark.parametrize("value", ["[", "{a", ","])
def test_override_whose_value_is_not_yaml_says_to_quote_it(value):
    _one_line_error(DEMO / "dico.yaml", BLANK + [f"tracking.run_name={value}"], f"'tracking.run_name={value}'",
                    "not valid YAML", "tracking.run_name=")
    assert load_config(str(DEMO / "dico.yaml"), BLANK + [f"tracking.run_name='{value}'"]).tracking.run_name == value


@pytest.mark.parametrize("value, kind", [("Caption: a photo of", "a mapping"), ("[a, b]", "a list"),
                                         ("{x}", "a mapping")])
def test_text_override_that_yaml_reads_as_a_mapping_or_list_says_to_quote_it(value, kind):
    _one_line_error(DEMO / "dico.yaml", BLANK + [f"tracking.run_name={value}"], f"'tracking.run_name={value}'",
                    f"YAML reads the value as {kind}, not text", "tracking.run_name=")
    assert load_config(str(DEMO / "dico.yaml"), BLANK + [f'tracking.run_name="{value}"']).tracking.run_name == value


def test_section_replaced_by_scalar_names_the_key():
    _one_line_error(DEMO / "dico.yaml", BLANK + ["optim=3"], "'optim'")


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text(f"extends: {DEMO / 'base.yaml'}\ncaptioner:\n  widht: 64\n")
    _one_line_error(p, BLANK, "'captioner.widht'")


def test_wrong_type_in_yaml_file(tmp_path):
    p = tmp_path / "typed.yaml"
    p.write_text(f"extends: {DEMO / 'base.yaml'}\ntrain:\n  max_steps: many\n")
    _one_line_error(p, BLANK, "'train.max_steps'")


def test_missing_config_file(tmp_path):
    _one_line_error(tmp_path / "absent.yaml", [], "absent.yaml")


def test_missing_extends_target(tmp_path):
    p = tmp_path / "child.yaml"
    p.write_text("extends: gone.yaml\n")
    _one_line_error(p, [], "gone.yaml")


def test_circular_extends(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    _one_line_error(tmp_path / "a.yaml", [], "circular")
    (tmp_path / "self.yaml").write_text("extends: self.yaml\n")
    _one_line_error(tmp_path / "self.yaml", [], "circular", "self.yaml")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  stage: [xe\n  max_steps: 3\n")
    _one_line_error(p, [], "broken.yaml", "invalid YAML")


@pytest.mark.parametrize("text, needles", [
    ("- train\n- data\n", ["the top level is a list"]),
    ("train: 5\n", ["config key 'train' is a section of keys", "not a value"]),
    ("data:\n  synthetic: yes\n", ["config key 'data.synthetic' is a section of keys"]),
])
def test_a_yaml_of_the_wrong_shape_names_what_is_wrong(tmp_path, text, needles):
    p = tmp_path / "shape.yaml"
    p.write_text(text)
    _one_line_error(p, [], "shape.yaml", *needles)


def test_a_folder_given_as_config_and_a_section_given_a_value_on_the_command_line(tmp_path):
    _one_line_error(tmp_path, [], f"config {tmp_path} is a folder, not a YAML file")
    _one_line_error(DEMO / "xe.yaml", ["train=5"], "config key 'train' is a section of keys (train.<key>=...)",
                    "override train=5")


def test_an_empty_section_is_no_section(tmp_path):
    """`train:` with every key commented out means the defaults (or the file it extends), not an error."""
    p = tmp_path / "empty_sections.yaml"
    p.write_text(f"extends: {DEMO / 'xe.yaml'}\ntrain:\n  # max_steps: 3\ndata:\n  synthetic:\n")
    assert load_config(str(p), BLANK) == load_config(str(DEMO / "xe.yaml"), BLANK)


# ---- the CLI stops before anything heavy --------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["optim.lrr=1"], "optim.lrr"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["--bogus-flag"], "--bogus-flag"),
])
def test_cli_config_error_exits_fast(args, needle, clean_env):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "dico_scale/train.py", "--config", "configs/demo/dico.yaml", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    assert needle in lines[0]
    assert r.stdout == ""
    for text in ("DeepSpeed", "Initializing", "deepspeed"):
        assert text not in r.stdout + r.stderr
    assert elapsed < 15, f"took {elapsed:.1f}s"


# ---- serialisation -------------------------------------------------------------------------------------------------

def test_flatten_gives_dotted_keys():
    cfg = load_config(str(DEMO / "xe.yaml"), BLANK + ["optim.lr=0.25"])
    flat = flatten(cfg)
    assert flat["optim.lr"] == 0.25
    assert flat["train.stage"] == "xe"
    assert flat["data.synthetic.n_train"] == 2000
    assert flat["clip_model_configs"] == cfg.clip_model_configs
    assert not any(isinstance(v, dict) for v in flat.values())
    assert "optim" not in flat and "data.synthetic" not in flat


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(str(DEMO / "dico.yaml"), BLANK + ["optim.lr=3e-5", "captioner.dropout=0.25", "train.seed=7"])
    p = tmp_path / "saved.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(str(p))
    assert again == cfg
    assert flatten(again) == flatten(cfg)


# ---- engine helpers ------------------------------------------------------------------------------------------------

def _cfg(**optim) -> Config:
    c = Config()
    for k, v in optim.items():
        setattr(c.optim, k, v)
    return c


def test_cpu_threads_take_the_key_then_omp_num_threads_then_the_cores_this_process_may_use(monkeypatch):
    from dico_scale.engine import cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))  # a Slurm step's 8 cores of a larger node
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [cpu_threads(0, 1), cpu_threads(0, 2), cpu_threads(0, 3), cpu_threads(0, 16)] == [8, 4, 2, 1]
    for unusable in ("", "0", "four", "4,2"):  # OpenMP's nested form is not a count: the cores decide
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert cpu_threads(0, 2) == 4, unusable
    monkeypatch.setenv("OMP_NUM_THREADS", " 3")
    assert cpu_threads(0, 2) == 3 and cpu_threads(5, 2) == 5  # train.threads wins


@pytest.mark.parametrize("omp, want", [(None, 1), ("3", 3)])
def test_a_cpu_rank_runs_on_its_share_of_the_cores_it_may_use(omp, want):
    """The rank's torch threads after setup_environment: its affinity (one core here), or $OMP_NUM_THREADS."""
    code = ("import os, torch\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "from dico_scale.config import load_config\nfrom dico_scale.engine import setup_environment\n"
            f"setup_environment(load_config({str(DEMO / 'xe.yaml')!r}, {BLANK!r}))\nprint(torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**env, **({"OMP_NUM_THREADS": omp} if omp else {})})
    assert proc.returncode == 0 and proc.stdout.split() == [str(want)], proc.stderr[-2000:]


def test_lr_warmup_then_constant():
    from dico_scale.engine import lr_lambda

    c = _cfg(warmup_steps=4, schedule="constant")
    c.train.max_steps = 20
    f = lr_lambda(c)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(f(s) == 1.0 for s in range(4, 40))


def test_lr_no_warmup_constant_is_one():
    from dico_scale.engine import lr_lambda

    f = lr_lambda(_cfg(warmup_steps=0, schedule="constant"))
    assert f(0) == 1.0 and f(10 ** 6) == 1.0


def test_lr_cosine_reaches_floor_at_max_steps():
    from dico_scale.engine import lr_lambda

    c = _cfg(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    c.train.max_steps = 110
    f = lr_lambda(c)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # stays at the floor
    vals = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay
    assert all(0.1 - 1e-12 <= v <= 1.0 + 1e-12 for v in vals)


def test_lr_cosine_to_zero():
    from dico_scale.engine import lr_lambda

    c = _cfg(warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    c.train.max_steps = 8
    f = lr_lambda(c)
    assert f(0) == 1.0 and f(8) == pytest.approx(0.0, abs=1e-12)
    assert f(4) == pytest.approx(0.5)
    assert math.isfinite(f(100))


@pytest.mark.parametrize("ds_file", ["zero2.json", "zero3.json"])
def test_ds_config_on_cpu(ds_file):
    import json

    from dico_scale.engine import ds_config

    c = Config()
    c.train.deepspeed_config = str(REPO / "configs" / "deepspeed" / ds_file)
    c.train.micro_batch_size, c.optim.grad_accum, c.optim.grad_clip = 5, 3, 0.7
    ds = ds_config(c, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 5
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.7
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert "train_batch_size" not in ds
    stage = json.loads(Path(c.train.deepspeed_config).read_text())["zero_optimization"]["stage"]
    assert ds["zero_optimization"]["stage"] == stage
    json.dumps(ds)  # serialisable as DeepSpeed expects


def test_ds_config_explicit_bf16_respected(tmp_path):
    import json

    from dico_scale.engine import ds_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"bf16": {"enabled": False}, "train_batch_size": 99}))
    c = Config()
    c.train.deepspeed_config = str(p)
    ds = ds_config(c, on_gpu=True)
    assert ds["bf16"] == {"enabled": False} and "train_batch_size" not in ds


# ---- ZeRO stage, offload, precision and frozen-model placement ------------------------------------------------------

@pytest.mark.parametrize("ds_file", ["zero1.json", "zero2.json", "zero3.json", "zero3_offload_optimizer.json",
                                     "zero3_offload_param.json"])
def test_shipped_deepspeed_configs_load_with_every_stage(ds_file):
    for stage in ("evaluator", "xe", "dico"):
        cfg = load_config(f"configs/demo/{stage}.yaml", [f"train.deepspeed_config=configs/deepspeed/{ds_file}",
                                                         "evaluator.weights=", "captioner.image_encoder_weights=",
                                                         "train.init_from="])
        assert cfg.train.deepspeed_config.endswith(ds_file)


@pytest.mark.parametrize("block, needle", [
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "offload_param needs ZeRO stage 3, not 2"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
     "offload_optimizer needs ZeRO stage 1, 2 or 3"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "fp16 and bf16 are both enabled"),
    ({"optimizer": {"type": "Adam"}}, "remove its 'optimizer' block"),
    # sections DeepSpeed and the engine read as objects: AttributeError tracebacks at start before
    ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
     'zero_optimization.offload_optimizer is "cpu", not a JSON object'),
    ({"zero_optimization": {"stage": 2}, "bf16": True}, "bf16 is true, not a JSON object"),
    ({"zero_optimization": None}, "zero_optimization is null, not a JSON object"),
    # values DeepSpeed took the wrong way (true as stage 1, the string "false" as enabled) or the trainer replaced
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage True is not 0, 1, 2 or 3"),
    ({"bf16": {"enabled": "false"}}, 'bf16.enabled is "false", not true or false or "auto"'),
    ({"fp16": {"enabled": "auto"}}, 'fp16.enabled is "auto", not true or false'),
    ({"train_micro_batch_size_per_gpu": 7}, r"remove train_micro_batch_size_per_gpu \(7\): it comes from "
                                            r"train.micro_batch_size"),
    ({"gradient_clipping": 0.0}, r"remove gradient_clipping \(0.0\): it comes from optim.grad_clip"),
    ({"train_batch_size": 999}, "remove train_batch_size"),
    # what DeepSpeed refuses deep in deepspeed.initialize, after the models are built
    ({"amp": {"enabled": True}}, "remove its 'amp' block: apex AMP does not combine with ZeRO"),
    ({"sparse_gradients": True}, "remove its 'sparse_gradients' block"),
    ({"steps_per_print": 0}, "steps_per_print 0 is not a positive integer"),
    ({"data_types": {"grad_accum_dtype": "fp8"}}, 'data_types.grad_accum_dtype "fp8" is not one of fp32, fp16, bf16'),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "offload_param: device nvme needs an nvme_path"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}},
     "device nvme needs DeepSpeed's async_io op on a GPU node, not this CPU run"),
])
def test_deepspeed_combinations_that_cannot_work_fail_at_config_time(tmp_path, block, needle):
    import json

    p = tmp_path / "ds.json"
    p.write_text(json.dumps(block))
    with pytest.raises(ConfigError, match=needle) as e:
        load_config("configs/demo/xe.yaml", [f"train.deepspeed_config={p}", "evaluator.weights=",
                                             "captioner.image_encoder_weights="])
    assert "\n" not in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("monitor, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_monitor_whose_package_is_missing_is_one_line(tmp_path, monitor, package):
    import importlib.util
    import json

    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed here")
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({monitor: {"enabled": True}}))
    with pytest.raises(ConfigError, match=f"{monitor}.enabled needs the {package} package, which is not installed"):
        load_config("configs/demo/xe.yaml", [f"train.deepspeed_config={p}", *BLANK[:2]])


def test_offload_block_with_device_none_is_no_offload(tmp_path):
    import json

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "none"}}}))
    load_config("configs/demo/xe.yaml", [f"train.deepspeed_config={p}", "evaluator.weights=",
                                         "captioner.image_encoder_weights="])


@pytest.mark.parametrize("block, needle", [
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}},
     "zero_optimization.reduce_bucket_size -5: Input should be greater than 0 (DeepSpeed's DeepSpeedZeroConfig)"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
     "zero_optimization.offload_param.device \"gpu\": Input should be 'none', 'cpu' or 'nvme'"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket": 5}}, "zero_optimization.reduce_bucket 5: Extra inputs"),
    ({"fp16": {"loss_scale": -1}}, "fp16.loss_scale -1: Value error"),
    ({"tensorboard": {"enabled": "maybe"}}, "tensorboard.enabled \"maybe\": Input should be a valid boolean"),
])
def test_a_value_deepspeed_refuses_is_one_line_before_any_model_is_built(tmp_path, block, needle):
    """DeepSpeed's own pydantic models, on the JSON build_engine would pass, where train.run checks the precision
    (after setup_environment, before the process group and the models): DeepSpeed raised its ValidationError in
    deepspeed.initialize, after the models were built, as a traceback on every rank."""
    import json

    from dico_scale.engine import check_precision

    p = tmp_path / "ds.json"
    p.write_text(json.dumps(block))
    cfg = load_config("configs/demo/xe.yaml", [f"train.deepspeed_config={p}", *BLANK])
    with pytest.raises(ConfigError) as e:
        check_precision(cfg)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"train.deepspeed_config '{p}': ")
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("ds_file", sorted(p.name for p in (REPO / "configs" / "deepspeed").glob("*.json")))
def test_shipped_deepspeed_configs_pass_deepspeeds_own_models(ds_file):
    from dico_scale.engine import check_deepspeed_json

    for on_gpu in (False, True):
        check_deepspeed_json(load_config("configs/demo/xe.yaml", [f"train.deepspeed_config=configs/deepspeed/"
                                                                  f"{ds_file}", *BLANK]), on_gpu)


@pytest.mark.parametrize("override, key", [("train.precision=fp8", "train.precision"),
                                           ("evaluator.placement=everywhere", "evaluator.placement"),
                                           ("dico.reference_placement=sharded", "dico.reference_placement")])
def test_bad_precision_or_placement_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("configs/demo/dico.yaml", [override, "evaluator.weights=", "captioner.image_encoder_weights=",
                                               "train.init_from="])


def test_deepspeeds_deprecated_key_warning_is_left_to_the_engine(tmp_path):
    """The check parses the JSON with DeepSpeed's models, which warn of deprecated keys; deepspeed.initialize parses
    it again and warns once more: the check keeps quiet (and leaves DeepSpeed's logger as it found it)."""
    import json
    import logging

    from deepspeed.runtime.zero.config import get_zero_config
    from deepspeed.utils import logger

    from dico_scale.engine import check_deepspeed_json

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2, "cpu_offload": False}}))
    cfg = load_config("configs/demo/xe.yaml", [f"train.deepspeed_config={p}", *BLANK])
    records, level = [], logger.level
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # its own handler's stream may be stale here
    logger.addHandler(handler)
    try:
        check_deepspeed_json(cfg, on_gpu=False)
        assert records == [] and logger.level == level
        get_zero_config(json.loads(p.read_text()))  # as the engine reads it: DeepSpeed's warning
        assert any("cpu_offload is deprecated" in r for r in records), records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("placement, ds_file, want", [
    ("auto", "zero2.json", "replicate"), ("auto", "zero3.json", "shard"),
    ("auto", "zero3_offload_optimizer.json", "shard"), ("auto", "zero3_offload_param.json", "shard_offload"),
    ("replicate", "zero3.json", "replicate"), ("shard", "zero2.json", "shard")])
def test_frozen_placement_follows_the_trainable_model(placement, ds_file, want):
    import json

    from dico_scale.deepspeed_json import frozen_placement

    ds = json.loads((REPO / "configs" / "deepspeed" / ds_file).read_text())
    assert frozen_placement(placement, ds) == want


def test_frozen_ds_config_has_no_optimizer_and_follows_precision():
    from dico_scale.engine import ds_config, frozen_ds_config

    c = Config()
    c.train.deepspeed_config = str(REPO / "configs" / "deepspeed" / "zero3.json")
    c.train.precision = "bf16"
    train = ds_config(c, on_gpu=False)
    assert train["bf16"]["enabled"] and not train["fp16"]["enabled"]
    shard = frozen_ds_config(train, "shard_offload", width=512)
    assert shard["zero_optimization"]["stage"] == 3 and shard["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert shard["zero_optimization"]["stage3_param_persistence_threshold"] == 5120  # TRL's 10 * hidden size
    assert shard["bf16"] == {"enabled": True} and "optimizer" not in shard
    assert frozen_ds_config(train, "replicate", width=512)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("precision, want", [("fp32", (False, False)), ("bf16", (True, False)),
                                             ("fp16", (False, True))])
def test_precision_overrides_the_json_and_keeps_its_loss_scale_settings(tmp_path, precision, want):
    import json

    from dico_scale.engine import ds_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"},
                             "fp16": {"enabled": False, "initial_scale_power": 12, "loss_scale_window": 500}}))
    c = Config()
    c.train.deepspeed_config, c.train.precision = str(p), precision
    ds = ds_config(c, on_gpu=True)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == want
    assert ds["fp16"]["initial_scale_power"] == 12 and ds["fp16"]["loss_scale_window"] == 500


def test_offloaded_optimizer_on_the_cpu_allows_torch_adamw():
    from dico_scale.engine import ds_config

    c = Config()
    c.train.deepspeed_config = str(REPO / "configs" / "deepspeed" / "zero3_offload_optimizer.json")
    assert ds_config(c, on_gpu=False)["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in ds_config(c, on_gpu=True)  # a GPU run uses DeepSpeedCPUAdam


def test_a_renamed_key_still_works_with_one_warning_line(tmp_path, capsys):
    """generation.beam_size -> generation.candidates: from an override, from a YAML (a checkpoint's config.yaml
    written before the rename), the new name winning when a file has both; one line per source."""
    from dico_scale.config import _warned

    _warned.clear()
    cfg = load_config("configs/demo/dico.yaml", BLANK + ["generation.beam_size=3", "generation.beam_size=3"])
    assert cfg.generation.candidates == 3 and not hasattr(cfg.generation, "beam_size")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dico_scale: warning: config key 'generation.beam_size' is now 'generation.candidates' "
                   "(override generation.beam_size=3); the old name will go"]
    old = tmp_path / "old.yaml"
    old.write_text("extends: " + str(REPO / "configs/demo/dico.yaml") + "\ngeneration:\n  beam_size: 4\n")
    assert load_config(str(old), BLANK).generation.candidates == 4
    both = tmp_path / "both.yaml"
    both.write_text("extends: old.yaml\ngeneration:\n  beam_size: 2\n  candidates: 6\n")
    assert load_config(str(both), BLANK).generation.candidates == 6
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(f"({p})" in line for line, p in zip(lines, (old, both)))


VLM_CONFIGS = {"smolvlm": "idefics3", "qwen2vl": "qwen2-vl", "qwen3vl": "qwen3-vl", "gemma3": "gemma3",
               "internvl": "internvl", "llava_next": "llava-next", "paligemma": "paligemma"}


@pytest.mark.parametrize("path", [p for d in VLM_CONFIGS for p in sorted((REPO / "configs" / d).glob("*.yaml"))],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vlm_configs_load_on_a_local_folder_of_their_family(path, vlm_folders):
    family = VLM_CONFIGS[path.parent.name]
    cfg = load_config(str(path), BLANK + [f"captioner.hf_path={vlm_folders[family]}", "train.init_from="])
    assert cfg.train.stage == (path.stem if path.stem != "base" else "xe")
    assert cfg.captioner.model == "hf_vlm" and cfg.captioner.lora.r == 16 and cfg.train.precision == "bf16"
    assert cfg.train.deepspeed_config.endswith("zero3.json") and not cfg.captioner.image_encoder_weights
    with pytest.raises(ConfigError, match="captioner.hf_path"):  # the placeholder folder is refused, in one line
        load_config(str(path), BLANK + ["captioner.hf_path=/nowhere/SmolVLM", "train.init_from="])


@pytest.mark.parametrize("override, readers", [("captioner.prompt=Describe it.", "hf_vlm"),
                                               ("captioner.freeze=vision,projection",
                                                "hf_encoder_decoder, dico_ref, hf_vlm")])
def test_a_row_setting_on_a_row_that_does_not_read_it_is_one_line(override, readers):
    """The built-in captioner asks no question and has no parts to freeze: the setting would be silently ignored."""
    key = override.split("=")[0]
    _one_line_error(DEMO / "xe.yaml", BLANK + [override], f"'{key}'", f"read by the rows {readers}, not "
                    "captioner.model=builtin")


def test_the_built_in_tower_file_is_checked_only_where_the_row_reads_it(vlm_folders):
    """The demo's configs name the built-in captioner's tower file; a Hugging Face row on them (the demo's own VLM
    runs, compare from a folder) reads its folder's tower instead, so that file need not exist yet."""
    tower = ["captioner.image_encoder_weights=/nowhere/tower.pt", "evaluator.weights=", "train.init_from="]
    cfg = load_config(str(DEMO / "dico.yaml"), tower + ["captioner.model=hf_vlm",
                                                       f"captioner.hf_path={vlm_folders['qwen2-vl']}"])
    assert cfg.captioner.model == "hf_vlm"
    _one_line_error(DEMO / "dico.yaml", tower, "captioner.image_encoder_weights", "'/nowhere/tower.pt' does not exist")


def test_settings_the_run_never_reads_are_named_in_one_warning_each(capsys, monkeypatch):
    """Another stage's keys, LoRA's options without LoRA, the cosine floor under a constant schedule, sampling's
    options where nothing samples: accepted (a shared base config may hold them), but never silently; once, from
    rank 0."""
    from dico_scale.train import parse_args  # the trainer's: compare and the demo load run configs too

    monkeypatch.delenv("RANK", raising=False)
    over = ["dico.beta=0.5", "dico.tau=10", "captioner.lora.alpha=8", "optim.schedule=constant"]  # xe's: cosine
    load_config(str(DEMO / "xe.yaml"), BLANK + over)
    assert capsys.readouterr().err == ""
    parse_args(["--config", str(DEMO / "xe.yaml"), *BLANK, *over])
    assert capsys.readouterr().err.strip().splitlines() == [
        "dico_scale: warning: dico.beta, dico.tau are set, but train.stage=xe reads them nowhere: they do nothing in "
        "this run",
        "dico_scale: warning: captioner.lora.alpha is set, but captioner.lora.r=0 reads it nowhere: it does nothing in "
        "this run",
        "dico_scale: warning: optim.min_lr_ratio is set, but optim.schedule=constant reads it nowhere: it does nothing "
        "in this run"]
    parse_args(["--config", str(DEMO / "dico.yaml"), *BLANK, "dico.beta=0.5", "optim.schedule=cosine",
                "optim.min_lr_ratio=0.1"])
    # temperature and top_k shape sampled candidates only; generation.strategy draws dico's alone
    parse_args(["--config", str(DEMO / "dico.yaml"), *BLANK, "generation.temperature=0.7"])
    parse_args(["--config", str(DEMO / "scst.yaml"), *BLANK, "scst.strategy=beam", "generation.strategy=sample",
                "generation.top_k=5"])
    assert capsys.readouterr().err.strip().splitlines() == [
        "dico_scale: warning: generation.temperature is set, but train.stage=dico with generation.strategy=beam reads "
        "it nowhere: it does nothing in this run",
        "dico_scale: warning: generation.strategy, generation.top_k are set, but train.stage=scst with "
        "scst.strategy=beam reads them nowhere: they do nothing in this run"]
    parse_args(["--config", str(DEMO / "dico.yaml"), *BLANK, "generation.strategy=sample", "generation.top_k=5"])
    parse_args(["--config", str(DEMO / "scst.yaml"), *BLANK, "generation.temperature=0.7"])  # scst samples
    parse_args(["--config", str(DEMO / "xe.yaml"), *BLANK, "data.synthetic.n_val=0", "train.val_every=1"])
    assert capsys.readouterr().err.strip().splitlines() == [
        "dico_scale: warning: train.val_every is set, but data.synthetic.n_val=0 reads it nowhere: it does nothing in "
        "this run"]
    monkeypatch.setenv("RANK", "1")
    parse_args(["--config", str(DEMO / "xe.yaml"), *BLANK, *over])
    assert capsys.readouterr().err == ""
