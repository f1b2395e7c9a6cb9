"""A griffe extension for the docs site (mkdocs.yml): the API reference as the docstrings mean it.

* ``normlab/__init__.py`` defines the API functions ``train`` and ``study`` and then wraps them so that the
  same names also reach the subpackages ``normlab/train/`` and ``normlab/study/``. Read statically, the
  subpackages shadow the functions and the API reference would lose them; this puts the functions back.
* Sphinx roles in docstrings (``:class:`X```, ``:func:`f```) become code spans (Markdown has no roles).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Function, Module

API_FUNCTIONS = ("train", "study")
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class ApiEntries(Extension):
    def __init__(self) -> None:
        super().__init__()
        self.functions: dict[str, Function] = {}

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)

    def on_function_instance(self, *, func: Function, **kwargs: Any) -> None:
        if func.parent is not None and func.parent.path == "normlab" and func.name in API_FUNCTIONS:
            self.functions[func.name] = func

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        if pkg.path != "normlab":
            return
        for name, func in self.functions.items():
            if name in pkg.members:
                pkg.del_member(name)
            pkg.set_member(name, func)
