"""The help texts of the ``attnx`` command (examples shown by ``attnx --help`` and
``attnx evaluate --help``)."""

__all__ = ["EPILOG", "EVALUATE_EXAMPLES"]

EPILOG = """\
examples:
  attnx demo --out gallery                      the main job: the embedded vision and text models,
                                                every method, pictures written to gallery/
  attnx explain cat.jpg --model vit_base_patch16_224 --method transformer_attribution
  attnx explain cat.jpg --model timm:vit_base_patch16_224 --target 243 282 --out dogcat.png
                                                one map per class, side by side
  attnx explain a.png b.png --method all --out grid.png   compare every method
  attnx explain a.png b.png --method all --out report.html
                                                the same as one interactive page (switch methods and
                                                classes, two side by side, values under the pointer)
  attnx explain --text "a gripping, beautifully shot film" --method generic --out review.html
  attnx explain --text "The capital of France is" --model openai-community/gpt2 --method generic
                                                a language model: its next token, marked after the prompt
  attnx explain --text "The capital of France is" --continuation " Paris" --model openai-community/gpt2
  attnx explain photo.jpg --model openai/clip-vit-base-patch32 --text "a cat" "a dog" --method generic
                                                a dual encoder (CLIP, SigLIP, open_clip:ViT-B-32/laion2b_s34b_b79k):
                                                one map per prompt
  attnx explain --model default-clip --text "where is the bag?" "where is the coat?" --method generic
                                                the embedded CLIP on the shipped scenes (or on image files)
  attnx explain                                  explain the embedded default scenes
  attnx methods                                  list the methods and their options
  attnx models                                   list what --model accepts
  attnx evaluate --task vision --out results     score every method (faithfulness, localisation,
                                                speed): tables and curves written to results/

Targets are class indices or class names (quote names with spaces). Method options are passed as
--option key=value, e.g. --option head_fusion=max --option discard_ratio=0.9.
"""


EVALUATE_EXAMPLES = """\
examples:
  attnx evaluate                                 every method on the shipped scenes, to attnx_evaluate/
  attnx evaluate --task text --limit 500 --methods rollout,generic,transformer_attribution
  attnx evaluate --num-scenes 1000               1000 new held-out scenes (needs Fashion-MNIST)
  attnx evaluate --data photos/ --model vit_base_patch16_224   a folder with one sub-folder per class
  attnx evaluate --data reviews.csv --model textattack/bert-base-uncased-SST-2   text,label columns
  torchrun --nproc_per_node 4 -m attnx.cli evaluate --num-scenes 1000   4 processes, one table
  attnx evaluate --num-scenes 1000 --shard 0/4 --out parts   one job per shard (0/4 ... 3/4), then
  attnx evaluate --merge parts                   merges them into the tables
  attnx evaluate --task vision --methods tokentm,legrad --out results --update
                                                 add or replace these rows in the league in results/
                                                 (its samples and settings; the other rows are kept)
  attnx evaluate --methods "gradient_x_input(libragrad=true)" --out results --update
                                                 a method with an option set: a row of its own

Writes league_<task>.md (the table, best values in bold, arrows: higher or lower is better),
league_<task>.html (the same table with sortable columns, and the curves, in one offline page),
league_<task>.csv, curves_<task>.png (mean perturbation, deletion and insertion curves) and
samples_<task>.npz (the per-sample results). Shards split the batches (--batch-size) round-robin;
merged, they give the table of a single run (only the timings differ).
"""
