"""Entry point of the ``petl`` command.

Sub-commands live one per file in this package and are imported only when invoked, so that
``petl --help`` and ``petl recipes ls`` answer without importing torch.
"""
from __future__ import annotations

import importlib

import click

#: sub-command name -> (module under petl.cli, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "recipes": ("recipes_cmd", "recipes", "List, show and copy published recipes."),
    "finetune": ("finetune", "finetune", "Fine-tune a model with a recipe (name or path) and overrides."),
    "eval": ("eval_cmd", "eval_group", "Evaluate: perplexity by length, passkey retrieval, GSM8K, task metrics."),
    "merge": ("merge", "merge", "Merge an adapter into its base model and save a plain transformers model."),
    "generate": ("generate", "generate", "Generate text, optionally with an H2O-compressed KV cache."),
    "viz": ("viz", "viz", "Draw attention patterns (S2 / SF) as PNG images."),
    "distill": ("distill", "distill", "LAWCAT: linearise a pretrained transformer by distillation."),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        module = importlib.import_module(f"petl.cli.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="petl-toolkit", prog_name="petl")
def main() -> None:
    """petl: parameter-efficient fine-tuning for long-context and domain adaptation.

    Run `petl finetune quickstart` to extend petl's embedded model to 4x its context on CPU.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
