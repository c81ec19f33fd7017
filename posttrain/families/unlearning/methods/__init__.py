"""The unlearning family's methods, one file per method page (params, registration of the method and of its
objective). Every module of this package is imported here (after the terms the objectives name), so a new method is
one new file, with no list to extend."""

import importlib
import pkgutil

import posttrain.families.unlearning.terms  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
