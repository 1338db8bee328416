"""Package discovery only; all metadata lives in pyproject.toml.

The `plugins/` folder is installed under the import name `keye_plugins` (a bare top-level `plugins`
package collides with other distributions), which needs a package_dir mapping that pyproject's
declarative `packages.find` cannot express for subpackages.
"""

from setuptools import find_packages, setup

core = find_packages(include=["keye", "keye.*"])
builtin_plugins = ["keye_plugins" + name[len("plugins"):] for name in find_packages(include=["plugins", "plugins.*"])]

setup(packages=core + builtin_plugins, package_dir={"keye_plugins": "plugins"})
