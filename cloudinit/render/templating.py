"""One jinja2 environment over templates/, shared by every renderer.

StrictUndefined turns a missing template variable into an error at render
time instead of an empty string in a file that boots a machine.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import jinja2

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(resources.files("tfcluster.templates"))),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` with ``context``."""
    return _env.get_template(template).render(**context)
