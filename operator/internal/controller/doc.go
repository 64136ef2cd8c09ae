// Package controller is the kleidi operator: one reconciler that keeps a KleidiNode for every selected Node,
// approves nodes (Automatic approval), keeps the keyring of record in the KleidiPlugin's status, enrolls approved
// nodes and runs KeyRotations, one at a time, phase by phase (rotation.go).
//
// The operator never runs an operation on a plugin itself: it writes a request into a KleidiNode's spec, the
// node's agent runs it and reports the outcome in that KleidiNode's status, and the operator moves on. Each
// request ID is derived from what it serves (the rotation's name and phase, the node enrolled), so after a
// restart the operator finds its requests where it left them and every step is idempotent.
//
// Every reconcile works on the whole cluster's state (there is one KleidiPlugin), so every watched object maps to
// one request, and the reconciler also requeues itself to notice stale heartbeats and due retirements.
package controller
