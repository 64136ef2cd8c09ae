// Package kmsclient tests the kleidi KMS v2 server through kleiditest.TestPlugin and kube-apiserver's own KMS client
// (k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2), over a real unix socket. It is a module of its own
// so that k8s.io/apiserver never reaches the dependencies of kleidi's users.
package kmsclient
