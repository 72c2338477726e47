"""Pure values and rules shared by every layer: names, labels, errors, configuration, the
state machine, the operator's settings, the control language, status, metrics, the ledger.
No trio, no pyfuse3."""
