"""Load a published petl recipe from Python, override fields, run it and read the results.

Run:  python examples/run_recipe.py            (the quickstart, shortened to 10 steps)
      python examples/run_recipe.py context/longlora-llama2-7b-8k train.max_steps=200   (on a GPU)
"""
from __future__ import annotations

import sys

import petl


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "quickstart"
    overrides = argv[1:] or ["train.max_steps=10", "eval.max_windows=4", "output.dir=runs/example_recipe",
                             "output.overwrite=true"]
    recipe = petl.load_recipe(name, overrides)        # validated: a bad key fails here, in one line
    print(f"running {recipe.name}: {recipe.description}")
    metrics = petl.run_recipe(recipe)
    for length, row in metrics.get("after", {}).get("perplexity", {}).items():
        before = metrics.get("before", {}).get("perplexity", {}).get(length, {}).get("ppl")
        print(f"context {length}: perplexity {before} -> {row['ppl']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
