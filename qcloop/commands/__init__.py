"""Sub-commands of the ``qcloop`` CLI, one module each (see qcloop.cli)."""
