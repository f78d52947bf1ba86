"""`veil console`: a local web page for a model owner or user, served on their own machine.

The console is a client, like `veil owner` and `veil user`: it runs with the principal's own
client directory (identity keys, trust anchors, request keys) and the deployment's addresses,
binds 127.0.0.1 only, and signs every action in its own process through the SDK. Nothing it
shows comes from the cloud unverified: model cards are checked against the owner's key given over
the KeyService's signed channel, the audit chain is verified by `veil keyservice audit`, and the
gateway's public metrics are labelled as the cloud's own figures.
"""

from veil.console.context import ConsoleContext, ConsoleSetupError

__all__ = ["ConsoleContext", "ConsoleSetupError"]
