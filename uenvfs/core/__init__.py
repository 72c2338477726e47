"""Values and rules that image/ and the layers after it share: names, labels, errors,
configuration, the operator's settings, the state machine, the control language, status,
metrics, what the manager and the filesystem share (model, interfaces), the ledger. No trio, no
pyfuse3."""
