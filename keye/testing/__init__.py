"""Test helpers for keye and for plugin authors.

Enable the fixtures in a plugin's test suite with ``-p keye.testing.pytest_plugin`` (or
``pytest_plugins = ["keye.testing.pytest_plugin"]`` in a conftest.py). They give every test a fresh
plugin host and registry, a way to write small blueprints, and `run_distributed` to run a function in
N real gloo processes. ``keye.testing.third_party`` lays out throwaway installed distributions and runs
``keye-launch`` in a fresh process that sees them (tests of plugin loading and precedence).
``keye.testing.tensor_parallel`` gathers and slices full tensors of a tensor-parallel module exactly as keye's
loaders do (``tp_gather``, ``tp_shard``), for tests that compare a TP=2 run with one process.
"""

from keye.testing.blueprints import tiny_blueprint, write_blueprint

__all__ = ["tiny_blueprint", "write_blueprint"]
