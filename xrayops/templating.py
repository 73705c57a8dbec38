"""HTML pages from the Jinja2 templates in xrayops/templates (evaluation report, change record).

Autoescaped: every value from a manifest, a registry or a person (a reviewer's note) is text,
never markup. Pages are self-contained (styles inline, figures as data: URIs) so one file can be
archived, attached to a KFP run or printed to PDF.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("xrayops", "templates"), autoescape=select_autoescape(["j2", "html"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context) -> str:
    return _environment().get_template(template).render(**context)
