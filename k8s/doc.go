// Package k8s holds no code: it is the Go module of keygate's Kubernetes
// manifests (base/, overlays/) and of the tests that keep them honest, kept
// apart from keygate's own go.mod so that kustomize, the Kubernetes API
// types and Istio's and Envoy Gateway's API types never become keygate's
// dependencies.
//
// There is no cluster in keygate's tests. Instead, each overlay is rendered
// with kustomize, every object is decoded strictly into its Go type (a
// misspelled field fails), the Envoy and keygate configurations inside the
// ConfigMaps are loaded by envoy.ParseBootstrap and keygate's own config
// loader, and the ports, flags, probes, selectors and addresses are checked
// against each other and against keygate's defaults.
package k8s
