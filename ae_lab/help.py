"""`python -m ae_lab --help`: ae_lab's own page, through Hydra's mechanism for an app's help.

`conf/hydra/help/ae_lab.yaml` sets `hydra.help.template` to `${ae_lab_help:}`, this module's `page`:
the config groups and their options as the `conf/` folder holds them (not the `schema/*` entries, which
are not options), the most used keys, the commands (every `python -m ae_lab.<module>` with a `main`),
and the documentation's pages (mkdocs.yml's nav). Generated on each call, so that it cannot fall behind
the folders.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ae_lab.paths import CONF, SWEEPS

PACKAGE = Path(__file__).resolve().parent
# the keys most runs set; each is checked to exist in the default config (tests/test_console.py)
MOST_USED = ("model.latent_dim", "model.arch", "model.hidden_dims", "loss.beta", "loss.sparsity_weight",
             "loss.recon", "dataset.batch_size", "trainer.max_epochs", "trainer.accelerator",
             "trainer.devices", "optim.lr", "seed", "resume", "verbose")


def config_groups(conf: Path) -> dict[str, list[str]]:
    """Each config group of `conf` (its subfolders) and its options, the default first; and
    `hydra/launcher`, whose options are also those launcher plugins registered in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    defaults: dict[str, str | None] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(conf / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update({key.removeprefix("override "): value for key, value in entry.items()})
    folders = [folder for folder in sorted(conf.iterdir()) if folder.is_dir() and folder.name != "hydra"]
    groups = {}
    for folder in [*folders, conf / "hydra" / "launcher"]:
        group = str(folder.relative_to(conf))
        options = sorted(path.stem for path in folder.glob("*.yaml"))
        if group == "hydra/launcher":
            options = sorted({*options, *(name.removesuffix(".yaml") for name in ConfigStore.instance().list(group))})
        default = defaults.get(group)
        groups[group] = sorted(options, key=lambda option: option != default)
    return {group: options for group, options in groups.items() if options}


def commands() -> dict[str, str]:
    """`ae_lab.<module>` -> the first paragraph of its docstring, for every module run as `python -m`."""
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        runs = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
        if runs and path.stem != "__main__":
            found[f"ae_lab.{path.stem}"] = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
    return found


def docs_pages(root: Path) -> list[tuple[str, Path]]:
    """The documentation's pages in the order of mkdocs.yml's nav: (title, file). A nav path is under
    `docs/`, except the benchmark reports, which the site takes from `benchmarks/` (docs/hooks.py); the
    title is the nav's, or else the page's first heading. Empty where there is no mkdocs.yml."""
    import yaml

    if not (root / "mkdocs.yml").exists():
        return []

    def entries(entry, title: str | None = None) -> list[tuple[str | None, str]]:
        if isinstance(entry, str):
            return [(title, entry)]
        if isinstance(entry, dict):
            return [page for key, value in entry.items() for page in entries(value, key)]
        return [page for item in entry for page in entries(item)]

    pages = []
    for title, path in entries(yaml.safe_load((root / "mkdocs.yml").read_text())["nav"]):
        file = root / "docs" / path if (root / "docs" / path).exists() else root / path
        heading = next((line[2:] for line in file.read_text().splitlines() if line.startswith("# ")), path)
        pages.append((title or heading.strip(), file.relative_to(root)))
    return pages


def page() -> str:
    """The help page (Hydra substitutes `$` names in it, so a literal dollar is written twice).

    Hydra resolves this template whenever it resolves a run's `hydra` config, but shows it for `--help`
    only: without `--help` on the command line the page is not built (it reads every config file and
    module of ae_lab, about 0.13 s each time, twice a run)."""
    if not {"--help", "-h"} & set(sys.argv[1:]):
        return "python -m ae_lab --help shows ae_lab's help page\n"
    width = max(map(len, config_groups(CONF))) + 2
    groups = [f"  {group + ':':<{width}}{', '.join(options)}" for group, options in config_groups(CONF).items()]
    groups.append(f"  {'+sweeps:':<{width}}{', '.join(sorted(path.stem for path in SWEEPS.glob('*.yaml')))}")
    lines = [
        "ae_lab: train, sweep and compare autoencoders (plain, denoising, sparse, contractive, VAE, beta-VAE).",
        "",
        "  python -m ae_lab [group=option ...] [key=value ...]    one run, into outputs/runs/<time>/",
        "  python -m ae_lab -m key=a,b [key=c,d ...]              a sweep: one job per combination",
        "",
        "Config groups (group=option; the first is the default):",
        *groups,
        "",
        "Most used keys (any key of the config can be set; python -m ae_lab --cfg job shows them all):",
        *_wrapped(", ".join(MOST_USED)),
        "",
        "Commands (each takes --help):",
        *(f"  python -m {module}: {summary.split(': ', 1)[-1]}" for module, summary in commands().items()),
        "",
        "Documentation, in reading order (mkdocs serve shows it as a site):",
        *_wrapped("; ".join(f"{title} ({file})" for title, file in docs_pages(CONF.parent))),
        "Hydra's own options: python -m ae_lab --hydra-help",
    ]
    return "\n".join(lines).replace("$", "$$") + "\n"


def _wrapped(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
