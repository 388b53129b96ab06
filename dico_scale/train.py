"""Entry point: `deepspeed dico_scale/train.py --config configs/demo/dico.yaml [key=value ...]`.

The config is loaded and checked before any process group starts: the keys every stage shares before anything
heavy is imported, then the stage's own keys by its class (stages/).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file (deepspeed dico_scale/X.py): our folder must not shadow other modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dico_scale import exit_codes  # noqa: E402
from dico_scale.config import Config, load_config, to_yaml  # noqa: E402
from dico_scale.errors import ConfigError, OneLineParser, Preempted  # noqa: E402


def parse_args(argv: list[str] | None) -> Config:
    parser = OneLineParser(prog="dico_scale.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file (may `extends:` a base file)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown command-line argument '{unknown[0]}' (overrides are key=value)")
    from dico_scale.checks import warn_unread_settings

    cfg = load_config(args.config, args.overrides)
    warn_unread_settings(cfg)
    return cfg


def run(cfg: Config) -> dict:
    """Trains one stage on this rank; returns a summary (step reached, last validation metrics)."""
    from dico_scale.engine import check_precision, setup_environment

    setup_environment(cfg)
    check_precision(cfg)  # before any process group: every rank would fail the same way
    from dico_scale.engine import init_distributed
    from dico_scale.supervision import OutputDirLock

    lock = OutputDirLock(cfg.train.output_dir)
    if os.environ["RANK"] == "0":  # before the process group: the launcher stops the other ranks when rank 0 fails
        lock.acquire()
    try:
        return _run_locked(cfg, init_distributed())
    finally:
        lock.release()


def _log0(msg: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(msg, flush=True)


def log_prob_projection(cfg: Config, stage, engine, memory: list, device) -> tuple[list[str], dict[str, str]]:
    """hf_vlm captioners: rank 0's lines on the log-prob pass's projected activations per rank (a warning where they
    and the models' states exceed the GPU) and their MLflow params (dico_scale.activations); nothing for another."""
    import torch

    from dico_scale.activations import Shape, project, projection_lines, run_lora
    from dico_scale.memory import engine_dtype_bytes

    if not hasattr(stage, "logprob_shape"):  # the evaluator's stage
        return [], {}
    shape, lora = Shape(*stage.logprob_shape(), engine_dtype_bytes(engine)), run_lora(cfg.captioner.lora)
    if (p := project(stage.module, shape, lora)) is None:
        return [], {}
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    states = sum(m.device_bytes for m in memory)
    return projection_lines(p, shape, lora, cfg.captioner.gradient_checkpointing, states, total), p.as_params()


def _run_locked(cfg: Config, device) -> dict:
    import torch
    import torch.distributed as dist

    from dico_scale.data.pipeline import Collate, eval_loader, train_loader
    from dico_scale.data.splits import training_shards
    from dico_scale.engine import build_engine, build_frozen, export_weights
    from dico_scale.loop import train_loop
    from dico_scale.memory import engine_memory, report
    from dico_scale.models.clip import register_model_configs
    from dico_scale.models.folders import generation_note
    from dico_scale.resume import plan_resume, resume_state
    from dico_scale.stages import build_stage
    from dico_scale.tracking import start_tracker

    rank, world = dist.get_rank(), dist.get_world_size()
    # Before anything heavy is built: a damaged newest tag is skipped, a bad explicit one or changed frozen model
    # files stop the run; a tag of another world size is converted (once) for this one.
    plan = plan_resume(cfg, _log0)
    if cfg.captioner.hf_path and (note := generation_note(cfg.captioner.hf_path, cfg.generation)):
        _log0(note)
    torch.manual_seed(cfg.train.seed)
    register_model_configs(cfg.clip_model_configs)
    shards, missing_shards = training_shards(cfg, rank)
    on_gpu = device.type == "cuda"
    stage = build_stage(cfg, device)
    engine = build_engine(cfg, stage.module, on_gpu=on_gpu, load_universal=plan.universal,
                          decay_exempt=stage.decay_exempt)
    frozen = {name: build_frozen(cfg, module, placement, width, on_gpu)
              for name, (module, placement, width) in stage.frozen_models().items()}
    stage.setup(engine, frozen)

    # The saved epoch goes on for its remaining batches, freshly shuffled: never a replay from its start.
    state = resume_state(engine, plan, cfg, _log0)
    if plan.tag is None:
        state.data["missing_shard"] += missing_shards  # counted once per run: a resumed run has them in its totals

    tracker = start_tracker(cfg, rank, state.mlflow_run_id, plan.tag)  # a store MLflow refuses: every rank stops
    memory = [engine_memory(stage.model_name, engine)] + [engine_memory(n, e) for n, e in frozen.items()]
    # rank 0's alone: the lines and params it writes
    projected, projected_params = log_prob_projection(cfg, stage, engine, memory, device) if rank == 0 else ([], {})
    for line in report(memory) + projected:
        _log0(line)
    if not tracker.resumed:  # params of a run are written once
        tracker.log_params({k: v for m in memory for k, v in m.as_params().items()} | projected_params)
    run_ids = [None] * world
    dist.all_gather_object(run_ids, tracker.run_id)  # every rank writes the run id into its checkpoint state
    state.mlflow_run_id = run_ids[0]
    if rank == 0:
        with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))

    d = cfg.data
    collate_args = (stage.preprocess, stage.eval_preprocess, stage.tokenizer, d.max_caption_tokens)

    def make_train_loader(epoch: int, start_batch: int = 0):
        seed = cfg.train.seed * 100_003 + epoch
        collate = Collate(*collate_args, seed=seed * 1_009 + start_batch * 31 + rank)
        return train_loader(shards["train"], collate, cfg.train.micro_batch_size, d.samples_per_epoch, world,
                            d.num_workers, d.shuffle_buffer, seed, start_batch=start_batch)[0]

    def make_val_loader():
        if not shards.get("val"):
            return None
        return eval_loader(shards["val"], Collate(*collate_args, seed=0), cfg.train.micro_batch_size, d.num_workers)

    try:
        summary = train_loop(cfg, stage, engine, tracker, make_train_loader, make_val_loader, state)
        export_weights(engine, os.path.join(cfg.train.output_dir, "model.pt"),
                       {"config": to_yaml(cfg), "stage": cfg.train.stage, "init_from": cfg.train.init_from,
                        "step": summary["step"], "mlflow_run_id": state.mlflow_run_id}, cfg.generation)
    except Preempted as p:
        tracker.finish("KILLED")  # the requeued job sets it back to RUNNING when it resumes
        summary = {"step": p.step, "val": {}, "preempted": True}
        if rank == 0:
            print(f"preempted: checkpoint saved at step {p.step}; "
                  + continue_advice("to continue, run the same command with train.resume=auto"), flush=True)
    except BaseException:
        tracker.finish("FAILED")
        raise
    else:
        tracker.finish()
    summary.update(rank=rank, world_size=world, mlflow_run_id=state.mlflow_run_id, engine=engine, stage=stage)
    return summary


def requeue_slurm_job() -> None:
    """Puts this Slurm job back in the queue; it resumes from the checkpoint with train.resume=auto."""
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if job:
        print(f"requeueing Slurm job {job}", flush=True)
        subprocess.run(["scontrol", "requeue", job], check=False)


def shutdown() -> None:
    """A final barrier, then tear the group down: ZeRO-3 ranks have aborted at exit without it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def continue_advice(own: str) -> str:
    """How to go on after the run stopped: `own`, unless the demo or compare started it (launch.CONTINUE: their
    command continues it, and refuses train.resume)."""
    from dico_scale.launch import CONTINUE

    return os.environ.get(CONTINUE) or own


def _error(line: str) -> None:
    """One write, newline included: every rank reports a collective failure at the same instant into the launcher's
    shared pipe, and print's separate write of the newline let two ranks' lines run together."""
    sys.stderr.write(f"dico_scale: {line}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    from dico_scale.supervision import record_launchers

    record_launchers()  # now, while the launcher chain can still be read: the ranks stop when it dies
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        _error(f"config error: {e}")
        return exit_codes.CONFIG_ERROR
    from dico_scale.data.pipeline import one_line
    from dico_scale.errors import CheckpointError, DataError, NonFiniteLossError
    from dico_scale.preflight import finished_run, run_preflight
    from dico_scale.selection import Selection

    try:
        run_preflight(cfg)  # output directory, tracking server: seconds, before any process group starts
        if done := finished_run(cfg):
            if int(os.environ.get("RANK", "0")) == 0:
                print(done, flush=True)
            return exit_codes.OK
        summary = run(cfg)
    except ConfigError as e:  # bad input found while building (weights files, model names, no shard exists)
        _error(f"config error: {e}")
        if getattr(e, "agreed", False):  # every rank raised it at the same point (AgreedConfigError)
            shutdown()
        return exit_codes.CONFIG_ERROR
    except CheckpointError as e:
        _error(f"checkpoint error: {e}")
        return exit_codes.FAILED
    except NonFiniteLossError as e:  # every rank counted the same all-reduced losses: they stop at the same step
        _error(f"training error: {e}: lower optim.lr, or check the rewards and the data")
        shutdown()
        return exit_codes.FAILED
    except DataError as e:
        _error(f"data error: {one_line(e)}")
        if e.agreed:  # all ranks stopped at the same step; a rank alone must not wait for the others here
            shutdown()
        return exit_codes.DATA_ERROR
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (start-up, export, the tracker's last sends)
        _error("interrupted (Ctrl-C) outside the training steps; " + continue_advice(
            "train.resume=auto continues from the newest complete checkpoint, if there is one"))
        return exit_codes.INTERRUPTED
    preempted = summary.get("preempted", False)
    if summary["rank"] == 0 and not preempted:
        print(f"done: stage={cfg.train.stage} step={summary['step']} val={summary['val']}", flush=True)
        if (sel := Selection.from_config(cfg.train)) and summary.get("best") is None:
            print(f"dico_scale: {sel.none_selected_line(cfg.train)}", file=sys.stderr, flush=True)
    shutdown()
    if preempted:
        if summary["rank"] == 0 and cfg.train.requeue_on_preempt:
            requeue_slurm_job()
        return exit_codes.PREEMPTED
    return exit_codes.OK


if __name__ == "__main__":
    exit_codes.leave(main())  # without the interpreter's teardown (seconds per process)
