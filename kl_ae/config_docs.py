"""``kl-ae config``: the resolved config as commented YAML, every key with its value, type and
documentation, and the list of shipped configs.

The output loads back with ``kl-ae train FILE`` (the comments are YAML comments), so it is also a
starting point for a config of one's own.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap

import yaml

from kl_ae.config import Config, shipped_configs

WIDTH = 100  # wrap documentation comments here


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: for each field, the string literal written on the
    lines after it (as in kl_ae/config.py), with its indentation removed.

    Python keeps no attribute docstrings at run time, so they are read from the class's source
    with ``ast`` (jsonargparse and docstring-parser do the same; neither is a dependency).
    Returns {} when the source is not available."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _comment(text: str, indent: str) -> list[str]:
    """``text`` as ``# `` comment lines: its paragraphs (blank-line separated) re-wrapped."""
    lines = []
    for paragraph in text.split("\n\n"):
        lines += textwrap.wrap(" ".join(paragraph.split()), WIDTH - len(indent) - 2) or [""]
    return [f"{indent}# {line}".rstrip() for line in lines]


def _flow(value) -> str:
    """``value`` as one line of YAML (lists in flow style)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]


def describe(cfg: Config, header: str = "") -> str:
    """``cfg`` as YAML: each section with its class docstring, each key preceded by a comment with
    its type, its documentation and, when it differs, the default value."""
    defaults = Config()
    lines = _comment(header, "") if header else []
    for section in dataclasses.fields(cfg):
        values, default_values = getattr(cfg, section.name), getattr(defaults, section.name)
        cls = type(values)
        lines += ["", *_comment(inspect.cleandoc(cls.__doc__ or ""), ""), f"{section.name}:"]
        docs = field_docs(cls)
        for f in dataclasses.fields(values):
            value, default = getattr(values, f.name), getattr(default_values, f.name)
            changed = "" if value == default else f" Default: {_flow(default)}."
            lines += _comment(f"({f.type}) {docs.get(f.name, '')}{changed}", "  ")
            lines.append(f"  {f.name}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def list_configs() -> str:
    """One line per shipped config: its name and the first line of its header comment."""
    lines = []
    for name, path in shipped_configs().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        lines.append(f"{name:<14} {first}")
    return "\n".join(lines) + "\n"
