"""The local cloud's "AMI": a Python with TensorFlow, as a Deep Learning AMI has one.

On EC2 the user-data creates the agent's venv with ``--system-site-packages``
on the image's python3, so a TensorFlow the image already has (AWS Deep
Learning AMIs) is used, and pip installs the staged wheel with the staged
constraints. Here the image is this machine's Python, and its TensorFlow
lies in the virtualenv the local cloud runs from. A venv made on top of that
virtualenv's interpreter sees the base interpreter's site-packages, not the
virtualenv's; so the difference is bridged by one layout key,
``image_site_packages``, which only the local cloud sets (`layout`):

* ``python`` is the virtualenv's base interpreter (what the venv is made on);
* ``image_site_packages`` names a folder of links to every package of the
  virtualenv except tfcluster's own (its dist-info and the editable install's
  finder): the user-data writes it into a ``.pth`` of the new venv, and pip
  then runs with ``--no-index``. With tfcluster left out, pip sees it as not
  installed, installs the staged wheel into the instance's own venv, and
  finds every dependency (TensorFlow included) already there: nothing is
  downloaded. A ``.pth`` in the linked folder is not read (only the venv's
  own site-packages are a site folder), so the checkout's editable install
  never reaches an instance.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

SITE_PACKAGES = "site-packages"
_OWN = re.compile(r"(tfcluster|__editable__[._]+tfcluster)([-_.].*)?|.*\.pth", re.IGNORECASE)
"""tfcluster's own entries (package, dist-info, editable finder) and .pth files."""


class ImageError(RuntimeError):
    """This Python cannot serve as the local image."""


def build(folder: Path) -> dict[str, str]:
    """Make the image's package folder under ``folder`` (once); the layout keys for it.

    Raises `ImageError` outside a virtualenv: then the packages would be the
    base interpreter's own, tfcluster with them, and no instance would need
    its wheel.
    """
    if sys.prefix == sys.base_prefix:
        raise ImageError(
            f"the local cloud runs from a virtualenv holding TensorFlow (make setup); "
            f"{sys.executable} is not in one"
        )
    source = Path(sysconfig.get_path("purelib"))
    target = folder / SITE_PACKAGES
    if not target.is_dir():
        partial = folder / f".{SITE_PACKAGES}.{os.getpid()}"
        partial.mkdir(parents=True)
        for entry in sorted(source.iterdir()):
            if not _OWN.fullmatch(entry.name):
                (partial / entry.name).symlink_to(entry)
        partial.rename(target)
    base = getattr(sys, "_base_executable", "") or sys.executable
    return {"python": base, "image_site_packages": str(target)}
