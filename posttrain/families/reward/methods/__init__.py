"""The reward family's methods, one file each (params and registration). Every module of this
package is imported here, so a new method is one new file, with no list to extend."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
