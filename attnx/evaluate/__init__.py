"""Evaluate explanation methods on a dataset: one row per method, faithfulness, localisation, speed.

>>> from attnx.evaluate import evaluate
>>> league = evaluate("vision")                      # every method on the embedded scenes
>>> print(league.to_markdown())
>>> league.to_csv("league_vision.csv"); league.plot_curves("curves_vision.png")
>>> league.samples["rollout"]["pos"]                 # the raw per-sample numbers behind the table

What is evaluated and what every column measures is declared once, in
:mod:`attnx.evaluate.columns` (:func:`protocol_markdown` renders it). The package's modules:

* :mod:`~attnx.evaluate.columns`: the protocol: data kinds, columns, baselines, seeds;
* :mod:`~attnx.evaluate.runner`: :func:`evaluate`, the loop over batches and methods;
* :mod:`~attnx.evaluate.tasks`: how scenes, image folders and texts are batched, explained, measured;
* :mod:`~attnx.evaluate.datasets`: the samples of each kind of data, in evaluation order;
* :mod:`~attnx.evaluate.league`: :class:`League`, the table computed from the per-sample results;
* :mod:`~attnx.evaluate.table`: markdown, CSV and curve figures;
* :mod:`~attnx.evaluate.storage`: per-sample results saved, loaded and merged from shards;
* :mod:`~attnx.evaluate.sharding`: ``shard="I/N"`` and ``torchrun`` (how shards merge exactly).
* :mod:`~attnx.evaluate.llm_league` and :mod:`~attnx.evaluate.facts`: the ``llm`` league, factual
  recall on a language model (subject rank, deletion curves; ``attnx evaluate --task llm``);
* :mod:`~attnx.evaluate.image_text`: the class-discrimination column on the embedded CLIP, the
  classes given as text prompts, beside the embedded ViT.
* :mod:`~attnx.evaluate.clip_league` and :mod:`~attnx.evaluate.similarity_league`: the ``clip``
  (the embedded CLIP's image tower, zero-shot on the scenes) and ``dinov2`` (photo-pair similarity
  against occlusion) leagues, tables of :mod:`~attnx.evaluate.sample_table`;
* :mod:`~attnx.evaluate.verdict`: which method wins each column of each table, by how much, and
  the recommendation per model kind (``verdict.md``, the README's verdict block).

The protocol of every task: ``docs/league_protocol.md``.
"""
from __future__ import annotations

from .columns import BASELINES, SCENE_SEEDS, Column, columns_help, protocol_markdown
from .league import League
from .runner import evaluate
from .sharding import launched_distributed, parse_shard, rank, shard_file

__all__ = [
    "BASELINES",
    "Column",
    "League",
    "SCENE_SEEDS",
    "columns_help",
    "evaluate",
    "launched_distributed",
    "parse_shard",
    "protocol_markdown",
    "rank",
    "shard_file",
]
