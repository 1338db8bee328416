"""pytest plugin for keye and for plugin authors (fixtures are added below)."""
