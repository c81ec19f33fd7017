"""The unlearning family's forget and retain terms, one file each (registered on import). Every module of this
package is imported here, so a new term is one new file, with no list to extend."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
