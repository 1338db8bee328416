"""Errors that are the user's to fix.

`keye-launch` prints a `KeyeUserError` as one line and exits with status 2, without a traceback.
Everything else is a bug in keye or a plugin and keeps its traceback.
"""


class KeyeUserError(Exception):
    """Bad input from the user: a blueprint, an override, a component name, a data file."""


class UnknownComponentError(KeyeUserError, KeyError):
    """A blueprint names a component that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(KeyeUserError):
    """Two plugins registered the same name for the same kind."""


class BlueprintError(KeyeUserError):
    """A blueprint (or an override) does not match the schema or a component's Config."""


class PluginOverrideError(KeyeUserError):
    """``KEYE_OVERRIDE`` (the user's request to replace a registered component on purpose) is malformed."""


class ContractError(TypeError):
    """A plugin's component class does not meet its kind's contract (`keye.contracts`): the plugin's bug,
    reported in one line naming the plugin, the class and the missing member; that plugin fails to load."""
