"""``attnx evaluate``: score the methods (faithfulness, localisation, speed), one table row per method.

The tables, curves and per-sample results go to ``--out`` (checked once, before anything runs);
``--shard I/N`` evaluates a part and ``--merge DIR`` combines the parts; ``--update`` runs only
``--methods`` on the samples of the league already in ``--out`` and puts their rows into it;
``--task llm`` is the factual-recall league of :mod:`attnx.evaluate.llm_league`. :mod:`attnx.evaluate` (torch) loads
inside the functions: only ``attnx evaluate --help`` reads it, for its baselines and columns.
"""
from __future__ import annotations

import argparse
import os
import re
import textwrap
import time
from pathlib import Path
from typing import Any

from ..errors import AttnxValueError
from ..viz.terminal import say
from .args import league_rows, non_negative_int, positive_int
from .help import EVALUATE_EXAMPLES
from .loading import add_model_file_arguments, load_model
from .paths import check_out

__all__ = ["ALL_TASKS", "add_parser", "cmd_evaluate"]

#: every league task, in the order ``--task all`` runs them
ALL_TASKS = ("vision", "text", "clip", "dinov2", "llm")
#: the leagues of embedded embedding models (one process, no shards)
EMBEDDING_TASKS = ("clip", "dinov2")


def evaluate_epilog() -> str:
    """``attnx evaluate --help``: the examples, the baselines and the columns (from their declarations)."""
    from .. import evaluate

    baselines = textwrap.fill(f"The baselines {' and '.join(evaluate.BASELINES)} are always added (--no-baselines leaves "
                              "them out unless named).", width=100)
    return EVALUATE_EXAMPLES + baselines + "\n\n" + evaluate.columns_help()


def evaluate_baselines() -> tuple[str, ...]:
    from .. import evaluate

    return tuple(evaluate.BASELINES)


def _write_league(league: Any, out: Path, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    task = league.task
    table = league.to_markdown()
    md = out / f"league_{task}.md"
    md.write_text(table + f"\nWall time: {wall:.1f} s.\n")
    league.to_csv(out / f"league_{task}.csv")
    fig = league.plot_curves(out / f"curves_{task}.png")
    del fig
    league.to_html(out / f"league_{task}.html")
    league.save(out / f"samples_{task}.npz")
    say(table)
    say(f"{task}: {len(league.methods)} methods, {len(league)} samples, wall time {wall:.1f} s")
    for name in (md.name, f"league_{task}.html", f"league_{task}.csv", f"curves_{task}.png", f"samples_{task}.npz"):
        say(f"wrote {out / name}")


def _evaluate_merge(args: argparse.Namespace) -> int:
    from .. import evaluate

    folder = Path(args.merge)
    if not folder.is_dir():
        raise AttnxValueError(f"no such folder: {folder}")
    groups: dict[str, list[Path]] = {}
    for f in sorted(folder.glob("samples_*.shard-*-of-*.npz")):
        m = re.fullmatch(r"samples_(\w+)\.shard-\d+-of-\d+\.npz", f.name)
        if m and (args.task in (None, "all") or args.task == m.group(1)):
            groups.setdefault(m.group(1), []).append(f)
    if not groups:
        raise AttnxValueError(f"no shard files (samples_<task>.shard-I-of-N.npz) in {folder}; "
                              "write them with attnx evaluate --shard I/N --out FOLDER")
    out = Path(args.out) if args.out else folder
    for files in groups.values():
        t0 = time.perf_counter()
        league = evaluate.League.merge([evaluate.League.load(f) for f in files])
        _write_league(league, out, time.perf_counter() - t0)
    _write_verdict(out, args.readme)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``attnx evaluate``: the league of each task, or the merge of shard files."""
    if args.merge and args.shard:
        raise AttnxValueError("give --shard (evaluate one shard) or --merge (combine shards), not both")
    check_out(args.out, None)  # a folder, whatever its name: the one check of --out
    if args.merge:
        return _evaluate_merge(args)
    if args.readme and not Path(args.readme).is_file():
        raise AttnxValueError(f"--readme {args.readme}: no such file")
    if args.task == "all" and (args.data or args.model):
        raise AttnxValueError("--task all evaluates the embedded models; give --task vision or --task text with --model/--data")
    if args.update:
        check_update(args)
    out = Path(args.out or "attnx_evaluate")
    tasks = list(ALL_TASKS) if args.task == "all" else [args.task]
    if "llm" in tasks:  # factual recall on a language model: its own protocol
        from ..evaluate import llm_league

        llm_league.run_cli(args, say)
    for task in [t for t in tasks if t in EMBEDDING_TASKS]:
        _embedding_league(task, args, out)
    rest = [t for t in tasks if t not in EMBEDDING_TASKS and t != "llm"]
    if rest:
        _classifier_leagues(args, rest[0] if len(rest) == 1 else "all", out)
    # one verdict, by the process that wrote the tables (a shard, or a torchrun rank other than 0, wrote none)
    if not args.shard and os.environ.get("RANK", "0") == "0":
        _write_verdict(out, args.readme)
    return 0


def check_update(args: argparse.Namespace) -> None:
    """``--update``: the cheap checks (before any model loads): a league folder, named methods, no shards."""
    if args.shard or args.merge:
        raise AttnxValueError("--update puts rows into a complete league; it does not combine with --shard or --merge")
    if not args.out:
        raise AttnxValueError("--update needs --out DIR, the folder of the league the rows go into")
    if args.methods == "all":
        raise AttnxValueError("--update runs the methods named by --methods (a comma list); to rerun every method, "
                              "regenerate the league without --update")
    if not Path(args.out).is_dir():
        raise AttnxValueError(f"--update: no such folder {args.out}; run attnx evaluate --out {args.out} first")
    if args.task == "all":  # every league must be there before any runs
        files = {t: f"samples_{t}.json" if t == "llm" else f"samples_{t}.npz" for t in ALL_TASKS}
        missing = [f for f in files.values() if not (Path(args.out) / f).is_file()]
        if missing:
            raise AttnxValueError(f"--task all --update: {args.out} lacks {', '.join(missing)} (the per-sample results of "
                                  "those leagues); regenerate them once, or update the other tasks one by one")


def _rows(args: argparse.Namespace) -> tuple[list[str] | None, bool]:
    """``--methods`` as league rows (``None``: every method), and whether the sanity row is named
    there (it is computed by the league itself: with ``--update`` it is added or replaced too)."""
    from ..evaluate.columns import SANITY_ROW

    if args.methods == "all":
        return None, False
    rows = league_rows(args.methods)
    return [r for r in rows if r != SANITY_ROW], SANITY_ROW in rows


def _stored_setting(flag: str, given: Any, stored: Any, task: str) -> None:
    if given is not None and given != stored:
        raise AttnxValueError(f"--update: the {task} league was run with {flag} {stored}, not {given}; leave it out "
                              "(the league's own is used) or regenerate the league")


def _write_verdict(out: Path, readme: str | None) -> None:
    """``verdict.md`` from the league CSVs in ``out`` (and the verdict block of ``readme``)."""
    from ..evaluate import verdict

    path = verdict.write_verdict(out, readme)
    say(f"wrote {path}" + (f" and the verdict block of {readme}" if readme else ""))


def _embedding_league(task: str, args: argparse.Namespace, out: Path) -> None:
    """``clip`` or ``dinov2``: the embedded model's league, written to ``out``."""
    given = [flag for flag, attr in (("--data", "data"), ("--model", "model"), ("--shard", "shard"),
                                     ("--num-scenes", "num_scenes")) if getattr(args, attr, None)]
    if given:
        raise AttnxValueError(f"{', '.join(given)} do(es) not apply to --task {task} (it evaluates an embedded model)")
    methods, named_sanity = _rows(args)
    limit, batch_size, baselines, old = args.limit, args.batch_size or 16, not args.no_baselines, None
    if args.update:  # the named rows, on the samples of the league in --out
        from ..evaluate.sample_table import SampleTable

        path = out / f"samples_{task}.npz"
        if not path.is_file():
            raise AttnxValueError(f"--update: no {task} league with per-sample values in {out} (samples_{task}.npz); "
                                  f"regenerate it once with attnx evaluate --task {task} --out {out}")
        old = SampleTable.load(path)
        _stored_setting("--limit", args.limit, old.meta.get("limit"), task)
        limit, baselines = old.meta.get("limit"), False
        if task == "clip":
            _stored_setting("--batch-size", args.batch_size, old.meta.get("batch_size"), task)
            batch_size = old.meta.get("batch_size", batch_size)
    t0 = time.perf_counter()
    if task == "clip":
        from ..evaluate.clip_league import evaluate_clip

        league = evaluate_clip(methods, limit=limit, batch_size=batch_size, baselines=baselines,
                               sanity=baselines or named_sanity, progress=not args.quiet)
    else:
        from ..evaluate.similarity_league import evaluate_similarity

        league = evaluate_similarity(methods, limit=limit, baselines=baselines, sanity=baselines or named_sanity,
                                     progress=not args.quiet)
    if old is not None:
        from .. import evaluate

        league = old.updated(league, evaluate.BASELINES)
    wall = time.perf_counter() - t0
    paths = league.write(out, wall)
    say(league.to_markdown())
    for path in paths:
        say(f"wrote {path}")


def _classifier_leagues(args: argparse.Namespace, task_arg: str | None, out: Path) -> int:
    """``vision`` and / or ``text``: the classifier leagues (shardable)."""
    from .. import evaluate
    from ..evaluate.datasets import check_data

    data_is_table = bool(args.data) and Path(args.data).suffix.lower() in (".csv", ".tsv", ".tab")
    task = task_arg or ("text" if data_is_table else "vision")
    tasks = ["vision", "text"] if task == "all" else [task]
    methods, named_sanity = _rows(args)  # cheap checks first
    if args.data:
        check_data(task, args.data)
    if args.model not in (None, "default") and not args.data and "vision" in tasks:
        raise AttnxValueError("the shipped scenes are for the embedded model; give --data FOLDER to evaluate --model")
    if args.num_scenes is not None and (args.data or task != "vision"):
        raise AttnxValueError("--num-scenes composes scenes for the embedded vision model (no --data, --task vision)")
    shard = evaluate.parse_shard(args.shard) if args.shard else None
    if shard is not None and evaluate.launched_distributed():
        raise AttnxValueError("under torchrun every process is a shard already; leave out --shard")
    for t in tasks:
        model = None
        if args.model not in (None, "default"):
            model = load_model(args, "text" if t == "text" else "image")
            model.info.setdefault("name", args.model)
        settings = dict(limit=args.limit, batch_size=args.batch_size or 16, baselines=not args.no_baselines,
                        randomisation_samples=16 if args.randomisation_samples is None else args.randomisation_samples,
                        sanity=not args.no_baselines)
        old = _stored_league(t, out, args, settings) if args.update else None
        settings["sanity"] = settings["sanity"] or named_sanity
        t0 = time.perf_counter()
        try:
            league = evaluate.evaluate(t, methods, model=model, data=args.data, num_scenes=args.num_scenes,
                                       progress=not args.quiet, shard=shard, **settings)
        except (FileNotFoundError, ModuleNotFoundError) as exc:  # data or packages missing: say how to get them
            raise AttnxValueError(f"{exc}") from exc
        if old is not None:
            league = old.updated(league, evaluate.BASELINES)
        wall = time.perf_counter() - t0
        if evaluate.rank() != 0:  # under torchrun rank 0 writes the tables
            continue
        if shard is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = league.save(out / evaluate.shard_file(t, shard))
            say(f"wrote {path} ({len(league)} of {league.meta['total']} samples, {wall:.1f} s); "
                f"when every shard is done: attnx evaluate --merge {out}")
            continue
        _write_league(league, out, wall)
    return 0


def _stored_league(task: str, out: Path, args: argparse.Namespace, settings: dict) -> Any:
    """``--update`` of a vision or text league: the league in ``out``, and ``settings`` set to those it
    was run with (a flag given with another value is refused); its rows are then computed alone
    (no baselines, no sanity row unless named)."""
    from .. import evaluate

    path = out / f"samples_{task}.npz"
    if not path.is_file():
        raise AttnxValueError(f"--update: no {task} league in {out} (samples_{task}.npz); "
                              f"run attnx evaluate --task {task} --out {out} first")
    old = evaluate.League.load(path)
    meta = old.meta
    stored_limit = meta.get("num_samples")
    randomisation = int((meta.get("randomisation") or {}).get("samples", 0))
    if args.limit is not None and args.limit != stored_limit:
        _stored_setting("--limit", args.limit, stored_limit, task)
    _stored_setting("--batch-size", args.batch_size, meta.get("batch_size"), task)
    _stored_setting("--randomisation-samples", args.randomisation_samples, randomisation, task)
    settings.update(limit=stored_limit, batch_size=int(meta["batch_size"]), randomisation_samples=randomisation,
                    baselines=False, sanity=False)
    return old


def add_parser(sub: Any, full_help: bool = True) -> argparse.ArgumentParser:
    """``attnx evaluate`` and its flags; ``full_help=False`` leaves out the epilog and the
    baselines' names (read from :mod:`attnx.evaluate`, which imports torch)."""
    ev = sub.add_parser("evaluate", help="score the methods: faithfulness, localisation and speed, one table row per method",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=evaluate_epilog() if full_help else None)
    ev.add_argument("--task", choices=[*ALL_TASKS, "all"], default=None,
                    help="vision (default; text for a .csv/.tsv --data), text, clip (the embedded CLIP's image tower), "
                    "dinov2 (photo-pair similarity), llm (factual recall on --model, default smollm2; see "
                    "docs/league_llm.md), or all (every task on its embedded model; the llm league takes about half an "
                    "hour). After the tables, verdict.md is written from the league CSVs in --out (docs/league_protocol.md)")
    ev.add_argument("--methods", default="all", help="a comma list of methods, or 'all' (default)")
    ev.add_argument("--model", default=None, help="see `attnx models`; default: the embedded model of the task")
    add_model_file_arguments(ev)
    ev.add_argument("--data", default=None, help="an image folder (one sub-folder per class) or a CSV/TSV file with text,label columns")
    ev.add_argument("--num-scenes", type=positive_int, default=None, help="compose N new held-out scenes (needs Fashion-MNIST)")
    ev.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N scenes / images / texts only")
    ev.add_argument("--batch-size", type=positive_int, default=None, help="samples per batch (default 16)")
    ev.add_argument("--randomisation-samples", metavar="N", type=non_negative_int, default=None,
                    help="the model-parameter randomisation sanity check (columns rand. ρ and head ρ) runs on the "
                    "first N samples (default 16; 0: leave it out)")
    ev.add_argument("--out", default=None, help="output folder (default attnx_evaluate/; with --merge: the merged folder)")
    ev.add_argument("--shard", metavar="I/N", default=None, help="evaluate shard I of N (batches I, I+N, ...) and save its samples")
    ev.add_argument("--merge", metavar="DIR", default=None, help="merge the shard files in DIR into the tables")
    ev.add_argument("--update", action="store_true", help="add or replace rows in the league already in --out: run only "
                    "--methods (names, or method(option=value, ...)) on its samples with its settings (refused if they "
                    "differ), replace the rows of methods already there, add the others, and rewrite the task's files "
                    "and verdict.md")
    ev.add_argument("--no-baselines", action="store_true", help="do not add the baselines" + (
        f" {' and '.join(evaluate_baselines())}" if full_help else "") + " nor the sanity row")
    ev.add_argument("--readme", metavar="FILE", default=None, help="also replace the verdict block of FILE (the lines "
                    "between <!-- verdict:start --> and <!-- verdict:end -->) with the verdict")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_evaluate)
    return ev
